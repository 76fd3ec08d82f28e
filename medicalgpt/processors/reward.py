"""Tokenised preference pairs -> the pairwise features trl's RewardTrainer reads."""


def to_reward_features(dataset, num_proc=None, suffix_ids=()):
    """Pairwise features for trl's RewardTrainer: the full renderings of the conversations, prompt + response (which
    ends with the stop token) + `suffix_ids`, the template's closing suffix (`medicalgpt.rl.rewards.closing_ids`), as
    the official chat template renders them and as PPO, RLOO/GRPO and other tools feed them to the reward model.
    None (a split not asked for) gives None."""
    if dataset is None:
        return None
    suffix_ids = list(suffix_ids)
    return dataset.map(
        lambda row: {
            "chosen_ids": row["prompt_ids"] + row["chosen_ids"] + suffix_ids,
            "rejected_ids": row["prompt_ids"] + row["rejected_ids"] + suffix_ids,
        },
        remove_columns=["prompt_ids"],
        num_proc=num_proc,
        desc="Building reward pairs",
    )
