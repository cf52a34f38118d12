"""Using trained models: LAVIS-style feature extraction, image preprocessing and captioning, HTML galleries."""
