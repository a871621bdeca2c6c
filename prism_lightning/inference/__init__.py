"""The exported artifact and routed inference (``GatedModel``): needs the model layer only, never Lightning."""
