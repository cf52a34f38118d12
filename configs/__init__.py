"""Named model configs (`model/`) and the training and retrieval recipes, installed as `lavis_lite.configs`."""
