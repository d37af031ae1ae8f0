"""Ray lives here and nowhere else: Train workers (train.py), Tune sweeps (tune.py)."""
