"""Files: downloads and the cache (download.py), files written whole or not at all and never over a
user's (outputs.py), weight formats (formats/), checkpoints (checkpoint.py), ImageNet weights and
their sources (weights.py), a run folder's files (runfolder.py) and its run state (runstate.py)."""
