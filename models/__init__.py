"""Model presets (JSON) and the model card, installed as ``wsi_haloae.presets``."""
