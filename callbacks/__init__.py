"""Your own rewards: the home of user examples, apart from the packaged ones.

The package's rewards have one home each: pure scoring functions in ``pathvlm_lightning/rewards/``,
their callbacks (and the ``RewardCallback`` base class) in ``pathvlm_lightning/callbacks/rewards.py``.
Drop a ``RewardCallback`` subclass in this folder and add it to a GRPO config's
``model.init_args.rewards`` list by ``class_path`` (e.g. ``callbacks.conciseness.ConcisenessReward``),
running from the repository root. ``conciseness.py`` is a complete example: it reads each
completion's parse (reasoning, answer, layout), never the raw text with its own rules.
"""
