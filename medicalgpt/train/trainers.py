"""trl's DPO and ORPO trainers fed with pairs tokenised by `medicalgpt.processors.preference.tokenize_preference`.

Both trainers would otherwise re-tokenise text themselves and append the tokenizer's EOS, which is not always the
template's end-of-turn token (Qwen2.5 base: `<|endoftext|>` vs `<|im_end|>`). Tokenising once, here, keeps the
prompt and the learned answer exactly as SFT and inference see them.
"""

from trl import DPOTrainer
from trl.experimental.orpo import ORPOTrainer

from medicalgpt.constants import IGNORE_INDEX


class PreTokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on datasets that already hold prompt_ids, chosen_ids and rejected_ids."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class PreTokenizedORPOTrainer(ORPOTrainer):
    """ORPOTrainer on datasets that already hold prompt_ids, chosen_ids and rejected_ids."""

    def tokenize_row(self, feature, model=None):
        return build_orpo_features(feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"])


def build_orpo_features(prompt_ids, chosen_ids, rejected_ids):
    """The columns ORPOTrainer's collator expects; labels mask the prompt."""
    features = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for name, answer_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        features[f"{name}_input_ids"] = prompt_ids + answer_ids
        features[f"{name}_attention_mask"] = [1] * (len(prompt_ids) + len(answer_ids))
        features[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return features
