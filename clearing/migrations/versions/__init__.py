"""Migration steps, one module each (``vNNNN_<slug>.py``)."""
