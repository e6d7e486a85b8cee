"""Figures: drawing attention maps, composites, grids and overlays as PNG/JPEG (``drawing``) and their
inputs — device, frozen ViT, image files (``loading``)."""
