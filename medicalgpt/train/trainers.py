"""trl's DPO, ORPO, CPO (SimPO) and KTO trainers fed with pairs tokenised by
`medicalgpt.processors.preference.tokenize_preference` (KTO: its answers, `medicalgpt.processors.kto`).

The trainers would otherwise re-tokenise text themselves and append the tokenizer's EOS, which is not always the
template's end-of-turn token (Qwen2.5 base: `<|endoftext|>` vs `<|im_end|>`). Tokenising once, here, keeps the
prompt and the learned answer exactly as SFT and inference see them.
"""

from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
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


class PreTokenizedCPOTrainer(CPOTrainer):
    """CPOTrainer (CPO, SimPO, AlphaPO) on datasets that already hold prompt_ids, chosen_ids and rejected_ids."""

    def tokenize_row(self, feature, model=None):
        return build_orpo_features(feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"])


class PreTokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on datasets that already hold prompt_ids, completion_ids and label (medicalgpt.processors.kto).

    `_prepare_dataset` is private in trl 1.16 (read there): after tokenising, its one step that this data still needs
    is the KL answers, redone here (tests/train/test_kto.py checks the columns the trainer ends up with)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:  # apo_zero_unpaired estimates no KL term
            return dataset
        return dataset.map(
            add_kl_completions,
            batched=True,
            batch_size=args.per_device_train_batch_size,
            desc=f"KL answers ({dataset_name})",
        )


def add_kl_completions(batch):
    """KTO's KL term is estimated from mismatched pairs: within each batch (the batches trl's sequential sampler
    reads), example i gets the answer of example i - 1 (the first, the last one's), as trl 1.16 builds them."""
    answers = batch["completion_ids"]
    return {"KL_completion_ids": answers[-1:] + answers[:-1]}


def build_orpo_features(prompt_ids, chosen_ids, rejected_ids):
    """The columns ORPOTrainer's and CPOTrainer's collator expects; labels mask the prompt."""
    features = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for name, answer_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        features[f"{name}_input_ids"] = prompt_ids + answer_ids
        features[f"{name}_attention_mask"] = [1] * (len(prompt_ids) + len(answer_ids))
        features[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return features
