""" "packed_sdpa": packed rows attend one conversation at a time, with the outputs and gradients of sdpa's
block-diagonal mask, and everything else goes to transformers' own sdpa."""

import torch
from transformers import AutoModelForCausalLM

import medicalgpt.train.packed_attention as packed_attention
from medicalgpt.train.packed_attention import PACKED_SDPA, row_pieces, sequence_starts, use_packed_sdpa

CONVERSATIONS = [[7, 5, 4], [12, 1, 1, 4]]  # each row's conversations' lengths; row 0 is padded by 2 tokens


def packed_rows(vocab_size, padding=2):
    torch.manual_seed(0)
    length = max(sum(row) for row in CONVERSATIONS)
    ids = torch.randint(3, vocab_size, (len(CONVERSATIONS), length))
    positions = torch.zeros_like(ids)  # padding at position 0, as PackedRowsCollator pads
    for row, lengths in enumerate(CONVERSATIONS):
        positions[row, : sum(lengths)] = torch.cat([torch.arange(n) for n in lengths])
    real = positions.new_zeros(positions.shape, dtype=torch.bool)
    for row, lengths in enumerate(CONVERSATIONS):
        real[row, : sum(lengths)] = True
    assert (~real).sum() == padding
    return ids, positions, real


def load(model_dir, attention):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.set_attn_implementation(attention)
    return model


def test_rows_are_split_where_positions_restart_and_1_token_pieces_are_grouped():
    pieces = lambda positions, batch: row_pieces(sequence_starts(torch.tensor(positions), batch))  # noqa: E731
    positions = [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert pieces(positions, 2) == [(3, False), (2, False), (3, True), (4, False), (3, False), (1, True)]
    assert pieces([list(range(5))], 3) == [(5, False)] * 3  # one row's positions shared by the batch
    # 1-token conversations between longer ones: each attends to itself, the next one starts afresh
    assert pieces([[0, 1, 0, 0, 0, 1, 2]], 1) == [(2, False), (2, True), (3, False)]
    # positions that do not start at 0 or jump: a new sequence wherever a position does not follow the last
    assert pieces([[5, 6, 7, 2, 3]], 1) == [(3, False), (2, False)]


def test_packed_rows_have_the_outputs_and_gradients_of_the_block_diagonal_mask(tiny_model_dir, monkeypatch):
    calls = []
    sdpa = packed_attention.sdpa_attention_forward

    def counted(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[0], query.shape[2], attention_mask is None, kwargs.get("is_causal")))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", counted)
    results = {}
    for attention in ("sdpa", PACKED_SDPA):
        model = load(tiny_model_dir, attention)
        ids, positions, real = packed_rows(model.config.vocab_size)
        labels = ids.masked_fill(~real, -100)
        out = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[attention] = out.logits[real], out.loss, grads
    (logits, loss, grads), (packed_logits, packed_loss, packed_grads) = results["sdpa"], results[PACKED_SDPA]
    torch.testing.assert_close(packed_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    # Per layer: one causal call per conversation; row 0's padding and row 1's two 1-token conversations one call each.
    layers = model.config.num_hidden_layers
    causal, alone = [(1, n, True, True) for n in (7, 5, 4, 12)], (1, 2, False, False)  # alone: a diagonal mask
    assert calls == (causal[:3] + [alone, causal[3], alone, (1, 4, True, True)]) * layers


def test_padded_batches_and_generation_go_to_transformers_sdpa(tiny_model_dir, tiny_tokenizer, monkeypatch):
    prompts = ["小孩发烧怎么办？", "What helps a sore throat? Warm water"]
    monkeypatch.setattr(tiny_tokenizer, "padding_side", "left")  # the session's tokenizer, restored after
    batch = tiny_tokenizer(prompts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    outputs = {}
    for attention in ("sdpa", PACKED_SDPA):
        model = load(tiny_model_dir, attention).eval()
        with torch.no_grad():
            logits = model(**batch).logits
            ids = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        outputs[attention] = logits[batch["attention_mask"].bool()], ids
    torch.testing.assert_close(outputs[PACKED_SDPA][0], outputs["sdpa"][0], atol=1e-5, rtol=1e-5)
    assert outputs[PACKED_SDPA][1].tolist() == outputs["sdpa"][1].tolist()


def test_only_sdpa_models_are_switched_and_the_choice_is_not_saved(tiny_model_dir, tmp_path):
    model = load(tiny_model_dir, "sdpa")
    assert use_packed_sdpa(model) and model.config._attn_implementation == PACKED_SDPA
    model.save_pretrained(tmp_path / "saved")  # the choice stays with this run
    assert "packed_sdpa" not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    assert not use_packed_sdpa(load(tiny_model_dir, "eager"))
