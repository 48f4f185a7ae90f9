"""The engine: one fine-tune of a pretrained backbone, exactly as fastai does it (recipe in, Result out)."""
