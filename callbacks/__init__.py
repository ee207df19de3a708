"""Your own rewards: drop a ``RewardCallback`` subclass in this folder and add it to a config's
``model.init_args.rewards`` list by ``class_path`` (e.g. ``callbacks.conciseness.ConcisenessReward``),
running from the repository root. ``conciseness.py`` is a complete example.
"""
