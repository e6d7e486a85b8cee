"""COCO detection and instance segmentation (official ``evaluation/object_detection/{train,test}.py``)."""
