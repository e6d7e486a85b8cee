"""ADE20K semantic segmentation scripts (official ``evaluation/semantic_segmentation/{train,test}.py``)."""
