"""Drawing: attention maps, composites, grids and overlays written as PNG/JPEG."""
