"""Experiment configs: `python main.py --config=configs/NAME.py`."""
