""" "packed_sdpa" (medicalgpt/train/packed_attention.py) on the model classes and inputs that broke its first version
(found by a review that tried to break it): it computes what transformers' sdpa computes, splitting only the rows
whose mask is a packed row's block-diagonal one; and packing by default only where a model keeps packed sequences
apart (medicalgpt/train/packing.py: keeps_packed_sequences_apart)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from medicalgpt.train.packed_attention import (
    PACKED_SDPA,
    packed_pieces,
    packed_sdpa_attention,
    sequence_starts,
    use_packed_sdpa,
)
from medicalgpt.train.packing import honours_position_resets, keeps_packed_sequences_apart, resolve_packing

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64, head_dim=8)  # fmt: skip


def tiny(model_type, **overrides):
    config = AutoConfig.for_model(model_type)
    for key, value in {**TINY, **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def load_sdpa(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


def packed_row(lengths, row_length):
    """One packed row as PackedRowsCollator makes it: positions restart per conversation, padding at position 0."""
    positions = torch.zeros(row_length, dtype=torch.long)
    positions[: sum(lengths)] = torch.cat([torch.arange(n) for n in lengths])
    return positions


def logits_per_conversation(model, ids, lengths):
    """The oracle: each conversation run on its own."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    with torch.no_grad():
        logits = [model(input_ids=ids[None, s : s + n], use_cache=False).logits[0] for s, n in zip(starts, lengths)]
    return torch.cat(logits)


# GPTBigCode (StarCoder, SantaCoder, WizardCoder...): its blocks never pass `position_ids` to the attention
# (transformers 5.23 models/gpt_bigcode/modeling_gpt_bigcode.py), so packed_sdpa must keep transformers' mask.
@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_packed_rows_keep_conversations_apart(multi_query):
    model = tiny("gpt_bigcode", n_embd=32, n_layer=2, n_head=4, multi_query=multi_query)
    assert honours_position_resets(model)  # so the SFT default packs it as rows
    lengths = [5, 4]
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (sum(lengths),))
    positions = packed_row(lengths, sum(lengths))[None]
    expected = logits_per_conversation(model, ids, lengths)
    with torch.no_grad():
        sdpa = model(input_ids=ids[None], position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(sdpa, expected, atol=1e-5, rtol=1e-5)  # sdpa's block-diagonal mask: correct
    assert use_packed_sdpa(model)
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


# Rows all padding (position 0 throughout) next to a row with two conversations: the padding's 1-token pieces are one
# piece, across rows, and row 0 is still split.
def test_two_conversations_next_to_all_padding_rows_stay_apart(tiny_model_dir):
    model = load_sdpa(tiny_model_dir)
    lengths, row_length = [3, 2], 6  # row 0: conversations of 3 and 2 tokens, one padding token
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, row_length))
    positions = torch.stack([packed_row(lengths, row_length), torch.zeros(row_length, dtype=torch.long),
                             torch.zeros(row_length, dtype=torch.long)])  # fmt: skip
    with torch.no_grad():
        sdpa = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        use_packed_sdpa(model)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    expected = logits_per_conversation(model, ids[0], lengths)
    torch.testing.assert_close(sdpa[0, :5], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, :5], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, sdpa, atol=1e-5, rtol=1e-5)  # padding rows too


# With a KV cache transformers ignores the position resets (tests/train/test_packing.py relies on it), and so does
# packed_sdpa on a cache's first call: transformers' mask is then not a packed row's.
def test_prefill_with_a_kv_cache_is_transformers_sdpa(tiny_model_dir):
    model = load_sdpa(tiny_model_dir)
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    positions = packed_row([4, 3], 7)[None]
    with torch.no_grad():
        sdpa = model(input_ids=ids, position_ids=positions, use_cache=True).logits
        model.set_attn_implementation(PACKED_SDPA)
        packed = model(input_ids=ids, position_ids=positions, use_cache=True).logits
    torch.testing.assert_close(packed, sdpa, atol=1e-5, rtol=1e-5)


def sft_run(model_dir, out, monkeypatch, packed_sdpa, extra=()):
    """SFT through the real entry point: packed rows (default), LoRA, gradient checkpointing, evaluation during
    training and the chunked loss; packed_sdpa on, or off (sdpa's block-diagonal mask on the same rows)."""
    import medicalgpt.train.packed_attention as packed_attention
    import supervised_finetuning
    from medicalgpt.train import packing
    from tests.helpers import REPO

    if not packed_sdpa:
        monkeypatch.setattr(packing, "use_packed_sdpa", lambda model: False)
    splits, row_pieces = [], packed_attention.row_pieces
    monkeypatch.setattr(packed_attention, "row_pieces", lambda *args: splits.append(1) or row_pieces(*args))
    data = str(REPO / "data" / "finetune")
    argv = ["--model_name_or_path", model_dir, "--train_file_dir", data, "--validation_file_dir", data,
            "--do_train", "--do_eval", "--eval_strategy", "steps", "--eval_steps", "1", "--max_eval_samples", "6",
            "--max_steps", "2", "--max_train_samples", "12", "--per_device_train_batch_size", "3",
            "--template_name", "qwen", "--use_peft", "True", "--learning_rate", "1e-3", "--save_strategy", "no",
            "--output_dir", str(out), "--bf16", "False", "--gradient_checkpointing", "True", "--report_to", "none",
            "--disable_tqdm", "True", "--chunked_loss", "True", "--logging_steps", "1", *extra]  # fmt: skip
    supervised_finetuning.main(argv)
    monkeypatch.undo()
    assert bool(splits) == packed_sdpa  # rows were split by packed_sdpa, or never reached it
    return out


@pytest.mark.parametrize("extra", [(), ("--streaming", "True")], ids=["datasets", "streaming"])
def test_sft_run_with_packed_sdpa_learns_what_sdpa_learns(tiny_model_dir, tmp_path, monkeypatch, extra):
    import json

    from safetensors.torch import load_file

    runs = {on: sft_run(tiny_model_dir, tmp_path / str(on), monkeypatch, on, extra) for on in (True, False)}
    logs = {on: json.loads((out / "trainer_state.json").read_text())["log_history"] for on, out in runs.items()}
    losses = {on: [e[key] for e in log for key in ("loss", "eval_loss") if key in e] for on, log in logs.items()}
    assert len(losses[True]) >= 4 and losses[True][0] != losses[True][-1]  # train and eval losses, steps 1 and 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    weights = {on: load_file(out / "adapter_model.safetensors") for on, out in runs.items()}
    for name, weight in weights[False].items():
        torch.testing.assert_close(weights[True][name], weight, atol=1e-5, rtol=1e-4)
    saved = "".join(p.read_text() for p in runs[True].glob("*.json"))
    assert f'"{PACKED_SDPA}"' not in saved  # (the folder's name has it: the test's)


# Gemma 3 checkpoints from 4B up (google/gemma-3-4b-it...) are Gemma3ForConditionalGeneration, which
# AutoModelForCausalLM loads (medicalgpt/model/loader.py), with sliding-window layers set in config.text_config: a
# sliding layer's mask is not a packed row's, so packed_sdpa hands it to sdpa as it is.
def tiny_gemma3_multimodal():
    config = AutoConfig.for_model("gemma3")
    text = dict(TINY, vocab_size=300, sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    for sub, values in ((config.text_config, text), (config.vision_config, dict(vision, patch_size=14))):
        for key, value in values.items():
            setattr(sub, key, value)
    config.mm_tokens_per_image, config.image_token_index = 4, 299
    config.boi_token_index, config.eoi_token_index = 297, 298
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def test_gemma3_multimodal_sliding_layers_keep_their_window():
    model = tiny_gemma3_multimodal()
    assert honours_position_resets(model)  # the SFT default packs it as rows, so resolve_packing calls use_packed_sdpa
    torch.manual_seed(1)
    ids = torch.randint(3, 290, (1, 10))  # longer than the 3-token window
    packed = dict(input_ids=ids, position_ids=packed_row([6, 4], 10)[None], use_cache=False)  # a packed row too
    with torch.no_grad():
        sdpa = model(input_ids=ids, use_cache=False).logits, model(**packed).logits
        switched = use_packed_sdpa(model)
        after = model(input_ids=ids, use_cache=False).logits, model(**packed).logits
    assert switched
    for output, expected in zip(after, sdpa):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


# An attention_mask of ones next to position resets: transformers' sdpa then ignores the resets (the mask is not
# None: masking_utils._preprocess_mask_arguments) and attends across the whole row; packed_sdpa does the same.
def test_all_ones_padding_mask_with_position_resets_is_transformers_sdpa(tiny_model_dir):
    model = load_sdpa(tiny_model_dir)
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=packed_row([3, 3], 6).expand(2, -1))
    with torch.no_grad():
        sdpa = model(**inputs, use_cache=False).logits
        model.set_attn_implementation(PACKED_SDPA)
        packed = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(packed, sdpa, atol=1e-5, rtol=1e-5)


# transformers' "is_causal=False" config (bidirectional decoder, masking_utils.create_causal_mask's first branch):
# its mask is not a causal packed row's, so packed_sdpa computes what sdpa does, packed rows or not.
def test_bidirectional_config_packed_rows_are_transformers_sdpa():
    model = tiny("llama", is_causal=False)
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (2, 6))
    outputs = {}
    for position_ids in (None, packed_row([3, 3], 6)[None]):
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            sdpa = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
            model.set_attn_implementation(PACKED_SDPA)
            packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        outputs[position_ids is None] = sdpa, packed
    torch.testing.assert_close(outputs[True][1], outputs[True][0], atol=1e-5, rtol=1e-5)  # unpacked: equal
    torch.testing.assert_close(outputs[False][1], outputs[False][0], atol=1e-5, rtol=1e-5)


# Models whose layers carry state along a row (Qwen3.5's linear attention; Jamba, Falcon-H1, LFM2 alike) or build
# their mask without the position_ids (OPT, transformers 5.23 models/opt/modeling_opt.py) mix packed sequences on
# every kernel: `--packing` left unset must not pack them, and does pack the models that keep them apart.
def tiny_mixer(model_type, attention):
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    hybrid = dict(linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                  layer_types=["linear_attention", "full_attention"])  # fmt: skip
    overrides = dict(ffn_dim=64, word_embed_proj_dim=32) if model_type == "opt" else hybrid
    for key, value in {**TINY, **overrides}.items():
        setattr(text, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type, attention", [("qwen3_5", "sdpa"), ("opt", "eager"), ("opt", "sdpa")])
def test_models_that_mix_packed_sequences_are_not_packed_by_default(model_type, attention, caplog):
    from trl import SFTConfig

    model = tiny_mixer(model_type, attention)
    assert honours_position_resets(model)  # transformers' class and kernel alone would say pack
    lengths = [5, 4]
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (sum(lengths),))
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=packed_row(lengths, 9)[None], use_cache=False).logits[0]
    assert not torch.allclose(packed, logits_per_conversation(model, ids, lengths), atol=1e-3)  # they do mix
    assert not keeps_packed_sequences_apart(model)
    args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
    args.packing = None
    model.train()
    with caplog.at_level("WARNING", logger="medicalgpt"):
        assert resolve_packing(args, model) == "off"
    assert "mixed two sequences packed in one row when tried" in caplog.text and model.training  # mode kept
    assert model.config._attn_implementation == attention


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_bigcode"])
def test_models_that_keep_packed_sequences_apart_are_packed_by_default(model_type):
    from trl import SFTConfig

    model = tiny(model_type, n_embd=32, n_layer=2, n_head=4) if model_type == "gpt_bigcode" else tiny(model_type)
    assert keeps_packed_sequences_apart(model)
    args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
    args.packing = None
    assert resolve_packing(args, model) == "rows" and model.config._attn_implementation == PACKED_SDPA


def test_models_that_cannot_run_a_forward_yet_are_packed_without_the_try(monkeypatch):
    """Weights not loaded on this rank (meta tensors, as FSDP's CPU-RAM-efficient loading leaves ranks > 0) or
    partitioned by ZeRO-3: the default follows the model's class and kernel, as before the try existed."""
    from trl import SFTConfig

    from medicalgpt.train import packing

    def no_forward(model):
        raise AssertionError("a forward was tried")

    monkeypatch.setattr(packing, "keeps_packed_sequences_apart", no_forward)
    config = AutoConfig.for_model("llama", **TINY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
    args.packing = None
    assert resolve_packing(args, model) == "rows" and model.config._attn_implementation == PACKED_SDPA
    zero3 = tiny("llama")
    next(zero3.parameters()).ds_id = 0  # as DeepSpeed ZeRO-3 marks a partitioned parameter
    args.packing = None  # resolve_packing set it to what SFTTrainer must see
    assert resolve_packing(args, zero3) == "rows"


# From a second review: XGLM builds its mask without the position_ids, like OPT (transformers 5.23
# models/xglm/modeling_xglm.py), and its tiny random version leaks by ~1e-3 only: the try must still see it.
def test_the_try_refuses_xglm_whose_mask_ignores_position_resets():
    from trl import SFTConfig

    config = AutoConfig.for_model("xglm", d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=128,
                                  max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (9,))
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=packed_row([5, 4], 9)[None], use_cache=False).logits[0]
    assert (packed - logits_per_conversation(model, ids, [5, 4])).abs().max() > 1e-3  # it mixes them
    assert not keeps_packed_sequences_apart(model)
    args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
    args.packing = None
    assert resolve_packing(args, model) == "off"


# FSDP's CPU-RAM-efficient loading (configs/accelerate_fsdp.yaml) leaves ranks > 0 with meta weights until FSDP wraps
# the model: every rank must decide packing as rank 0 does, so none tries a forward there.
def test_every_fsdp_rank_decides_packing_alike(monkeypatch):
    from trl import SFTConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = lambda: AutoConfig.for_model("opt", **dict(TINY, ffn_dim=64, word_embed_proj_dim=32))  # noqa: E731
    torch.manual_seed(0)
    rank_0 = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.device("meta"):
        rank_1 = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa").eval()
    decisions = []
    for model in (rank_0, rank_1):
        args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
        args.packing = None
        decisions.append(resolve_packing(args, model))
    assert decisions == ["rows", "rows"]  # the class and kernel decide, on every rank


def test_the_try_leaves_every_modules_mode_as_it_was():
    model = tiny("llama").train()
    model.lm_head.eval()
    assert keeps_packed_sequences_apart(model)
    assert model.training and model.model.training and not model.lm_head.training


def test_a_position_bias_goes_to_transformers_sdpa_whole():
    class Attention(torch.nn.Module):
        is_causal, num_key_value_groups = True, 1

    torch.manual_seed(0)
    length, heads = 7, 2
    query, key, value = torch.randn(3, 1, heads, length, 8).unbind(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    sequence = sequence_starts(positions, 1).cumsum(-1)
    mask = ((sequence[:, :, None] == sequence[:, None, :]) & torch.ones(length, length).bool().tril())[:, None]
    bias = torch.randn(1, heads, length, length)
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, mask, position_bias=bias)
    output, _ = packed_sdpa_attention(Attention(), query, key, value, mask, position_ids=positions, position_bias=bias)
    torch.testing.assert_close(output, expected)


def test_the_checked_mask_is_checked_again_for_other_position_ids():
    """The check is remembered for one mask and one position_ids tensor: the same mask with other positions (or a
    new mask) is checked again."""
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    sequence = sequence_starts(positions, 1).cumsum(-1)
    mask = ((sequence[:, :, None] == sequence[:, None, :]) & torch.ones(5, 5).bool().tril())[:, None]
    assert packed_pieces(mask, positions, 1, 5) == [(3, False), (2, False)]
    assert packed_pieces(mask, positions, 1, 5) == [(3, False), (2, False)]  # remembered
    assert packed_pieces(mask, torch.tensor([[0, 1, 0, 1, 2]]), 1, 5) is None  # not this mask's rows
    assert packed_pieces(mask.clone(), positions, 1, 5) == [(3, False), (2, False)]
