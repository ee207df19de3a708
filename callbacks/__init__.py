"""Your own rewards: drop a ``RewardCallback`` subclass in this folder and name it in a config's
``trainer.callbacks`` by ``class_path`` (e.g. ``callbacks.conciseness.ConcisenessReward``), running
from the repository root. ``conciseness.py`` is a complete example.
"""
