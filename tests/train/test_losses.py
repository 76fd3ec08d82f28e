"""The chunked loss equals transformers' plain loss, in value and gradients; --use_liger_kernel fails clearly."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from trl import SFTConfig

import supervised_finetuning
from medicalgpt.cli import run_cli
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.errors import UsageError
from medicalgpt.train.chunked_loss import add_chunked_lm_head, chunked_lm_loss
from tests.helpers import FAST_FLAGS, write_jsonl


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def batch(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (3, 40), generator=generator)
    labels = input_ids.clone()
    labels[:, :12] = IGNORE_INDEX  # prompts
    labels[2, 25:] = IGNORE_INDEX  # padding
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(first, second):
    torch.testing.assert_close(first[0], second[0], atol=1e-6, rtol=1e-6)
    assert first[1].keys() == second[1].keys() and first[1]
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_items_in_batch", [None, 100])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tiny_model_dir, num_items_in_batch):
    model = load(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    plain = loss_and_grads(model, lambda: model(**inputs, **extra).loss)
    add_chunked_lm_head(model, chunk_size=7)  # many chunks, the last one partial
    chunked = loss_and_grads(model, lambda: model(**inputs, **extra, chunked_loss=True).loss)
    assert_same(plain, chunked)


def test_chunked_loss_under_lora_trains_the_same_adapter_gradients(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    plain_model = get_peft_model(load(tiny_model_dir), config)
    torch.manual_seed(0)
    chunked_model = get_peft_model(add_chunked_lm_head(load(tiny_model_dir), chunk_size=16), config)
    inputs = batch(plain_model.config.vocab_size, seed=1)
    plain = loss_and_grads(plain_model, lambda: plain_model(**inputs).loss)
    chunked = loss_and_grads(chunked_model, lambda: chunked_model(**inputs, chunked_loss=True).loss)
    assert all("lora_" in name for name in plain[1])
    assert_same(plain, chunked)


class VocabProducts(TorchDispatchMode):
    """Rows of every matrix product with a vocabulary-wide side (logits, or their gradient through the head), in the
    order run, tagged forward or backward."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows, self.phase = vocab, [], "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            first, second = args[-2], args[-1]
            if self.vocab in (*first.shape, *second.shape):
                self.rows.append((self.phase, first.shape[0]))
        return out


def vocab_products(model, inputs, chunk_size, grad=True):
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    with VocabProducts(model.config.vocab_size) as products:
        with torch.set_grad_enabled(grad):
            loss = chunked_lm_loss(hidden, model.lm_head, inputs["labels"], chunk_size=chunk_size)
        products.phase = "backward"
        if grad:
            loss.backward()
    return products.rows


def test_chunks_are_projected_once_with_their_gradients_in_forward(tiny_model_dir):
    """Each chunk of learned tokens: its logits, then at once the hidden states' and the head's gradients (the
    vocabulary-wide products); nothing vocabulary-wide is recomputed or left for backward. Prompts never projected."""
    model = load(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    learned = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert learned == 69
    rows = vocab_products(model, inputs, chunk_size=10)
    # per chunk: logits [n x vocab], hidden grad [n x vocab] @ [vocab x d], head grad [vocab x n] @ [n x d]
    per_chunk = [[("forward", n), ("forward", n), ("forward", model.config.vocab_size)] for n in [10] * 6 + [9]]
    assert rows == [product for chunk in per_chunk for product in chunk]


def test_an_eval_forward_computes_the_logits_only(tiny_model_dir):
    model = load(tiny_model_dir)
    rows = vocab_products(model, batch(model.config.vocab_size), chunk_size=10, grad=False)
    assert rows == [("forward", n) for n in [10] * 6 + [9]]


def test_frozen_head_gets_no_gradient_product(tiny_model_dir):
    """LoRA: the head is frozen, so only the hidden states' gradient is computed."""
    model = load(tiny_model_dir)
    model.lm_head.weight.requires_grad_(False)
    rows = vocab_products(model, batch(model.config.vocab_size), chunk_size=1000)
    assert rows == [("forward", 69), ("forward", 69)]


def test_partitioned_head_runs_through_the_module_recomputing_chunks(tiny_model_dir):
    """A head whose weight cannot be read whole (ZeRO-3 marks it with ds_id) runs through the module, where
    DeepSpeed's hooks gather it: every chunk but the last under activation checkpointing, same loss and gradients."""
    model = load(tiny_model_dir)
    inputs = batch(model.config.vocab_size)

    def loss():
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
        return chunked_lm_loss(hidden, model.lm_head, inputs["labels"], chunk_size=10)

    direct = loss_and_grads(model, loss)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape[0]))
    model.lm_head.weight.ds_id = 0
    through_module = loss_and_grads(model, loss)
    # backward recomputes every chunk but the last, whose logits it frees first
    assert rows == [10] * 6 + [9] + [10] * 6
    assert_same(direct, through_module)


@pytest.mark.parametrize("setting", ["bfloat16 weights", "bfloat16 autocast"])
def test_bfloat16_loss_and_gradients_equal_the_plain_ones(tiny_model_dir, setting):
    """bf16 checkpoints and bf16 mixed precision: the same casts as transformers' loss (logits in bf16, then
    float32), so the same loss and gradients to bf16 rounding."""
    model = load(tiny_model_dir)
    if setting == "bfloat16 weights":
        model.to(torch.bfloat16)
    inputs = batch(model.config.vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bfloat16 autocast")
    with autocast:
        plain = loss_and_grads(model, lambda: model(**inputs).loss)
    add_chunked_lm_head(model, chunk_size=7)
    with autocast:
        chunked = loss_and_grads(model, lambda: model(**inputs, chunked_loss=True).loss)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-3, atol=1e-3)
    assert chunked[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        assert chunked[1][name].dtype == grad.dtype
        torch.testing.assert_close(chunked[1][name].float(), grad.float(), rtol=0.02, atol=1e-3, msg=name)


def test_a_batch_without_learned_tokens_gives_a_zero_loss(tiny_model_dir):
    model = add_chunked_lm_head(load(tiny_model_dir))
    inputs = batch(model.config.vocab_size)
    inputs["labels"][:] = IGNORE_INDEX
    loss = model(**inputs, chunked_loss=True).loss
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sft_trainer_losses_agree_chunked_fused_and_plain(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The script's chunked trainer, trl's fused LM head and transformers' plain loss on one SFT batch."""
    import datasets
    from trl import SFTTrainer

    from tests.train.test_packing import tokenised

    dataset = datasets.Dataset.from_list(tokenised(tiny_tokenizer))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", bf16=False,
                     use_cpu=True, max_length=4096)  # fmt: skip
    model = load(tiny_model_dir)
    fused = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    inputs = next(iter(fused.get_train_dataloader()))
    plain_result = loss_and_grads(model, lambda: model(**inputs).loss)
    fused_result = loss_and_grads(model, lambda: fused.compute_loss(model, dict(inputs)))
    chunked_model = add_chunked_lm_head(load(tiny_model_dir))
    chunked = supervised_finetuning.ChunkedLossSFTTrainer(
        model=chunked_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer
    )
    chunked_result = loss_and_grads(chunked_model, lambda: chunked.compute_loss(chunked_model, dict(inputs)))
    assert_same(plain_result, fused_result)
    assert_same(plain_result, chunked_result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard")
def test_use_liger_kernel_without_a_gpu_fails_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "发烧怎么办？", "output": "多喝水。"}])
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train",
            "--output_dir", str(tmp_path / "out"), "--use_liger_kernel", "True", *FAST_FLAGS]  # fmt: skip
    with pytest.raises(UsageError, match="--use_liger_kernel needs a CUDA GPU"):
        supervised_finetuning.main(argv)
    assert run_cli(lambda: supervised_finetuning.main(argv)) == 1
    assert "error: --use_liger_kernel needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["float16 weights", "float16 autocast"])
def test_float16_head_gradient_does_not_overflow_where_the_plain_one_does_not(setting):
    """fp16 (V100 / T4 mixed precision, `--fp16`): the head's gradient summed over a chunk of 1,500 tokens that share
    a target and a hidden value of 60 is 90,000 before the division by the token count, past float16's 65,504.
    transformers' loss divides first and gets 60; the chunked one must too, not inf (after which a GradScaler would
    skip every step, whatever scale it tries)."""
    from torch import nn

    torch.manual_seed(0)
    tokens, width, vocab = 1500, 8, 50
    hidden_states = torch.randn(1, tokens + 1, width)
    hidden_states[..., 0] = 60.0
    labels = torch.full((1, tokens + 1), 5)
    head = nn.Linear(width, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.01)
    if setting == "float16 weights":
        head.half()
        hidden_states = hidden_states.half()
    hidden_states.requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=setting == "float16 autocast")
    grads = []
    for chunked in (False, True):
        head.zero_grad(), setattr(hidden_states, "grad", None)
        with autocast:
            if chunked:
                loss = chunked_lm_loss(hidden_states, head, labels, chunk_size=tokens)
            else:
                logits = head(hidden_states[:, :-1]).float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        grads.append((head.weight.grad.clone(), hidden_states.grad.clone()))
    (plain_weight, plain_hidden), (chunked_weight, chunked_hidden) = grads
    assert torch.isfinite(plain_weight).all() and plain_weight[5, 0].item() == pytest.approx(-60, rel=0.02)
    assert torch.isfinite(chunked_weight).all(), "float16 overflow in the head's gradient"
    torch.testing.assert_close(chunked_weight.float(), plain_weight.float(), rtol=0.01, atol=1e-3)
    torch.testing.assert_close(chunked_hidden.float(), plain_hidden.float(), rtol=0.01, atol=1e-4)


def test_head_placed_by_accelerate_runs_through_the_module(tiny_model_dir):
    """`--device_map auto` with too little GPU memory offloads the head: its weight is on the meta device and
    accelerate's hook brings it in only inside the module's forward (on several GPUs the hook moves the input to the
    weight's device). Read directly the weight gave a wrong loss, silently; through the module it is the plain one."""
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, tie_word_embeddings=False)
    inputs = batch(model.config.vocab_size)
    plain = loss_and_grads(model, lambda: model(**inputs).loss)
    cpu_offload(model.lm_head, execution_device=torch.device("cpu"))
    assert model.lm_head.weight.device.type == "meta"
    add_chunked_lm_head(model, chunk_size=7)
    chunked = loss_and_grads(model, lambda: model(**inputs, chunked_loss=True).loss)
    plain = (plain[0], {name: grad for name, grad in plain[1].items() if name != "lm_head.weight"})
    assert_same(plain, chunked)


def test_float16_autocast_gradients_keep_their_small_values():
    """fp16 mixed precision, 2,000 learned tokens, a GradScaler's scale of 2**16: each gradient element is the
    float32 one to 1% of itself or 0.1% of the largest (none flushed to zero), as the plain loss's scaled fp16
    gradients are. Products of the gradient divided by the token count but not yet scaled flush the many small ones,
    ~|W| / 2,000, below fp16's smallest normal value."""
    from torch import nn

    torch.manual_seed(0)
    tokens, width, vocab = 2000, 16, 64
    hidden_states = torch.randn(1, tokens + 1, width, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    head = nn.Linear(width, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.002)
    grads = []
    for autocast in (False, True):
        head.zero_grad(), setattr(hidden_states, "grad", None)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = chunked_lm_loss(hidden_states, head, labels, chunk_size=500)
        (loss * 2**16).backward()
        grads.append(hidden_states.grad.clone())
    reference, mixed = grads
    torch.testing.assert_close(mixed, reference, rtol=0.01, atol=1e-3 * reference.abs().max().item())


class HeadSizedTensors(TorchDispatchMode):
    """Counts the tensors as large as the head's weight that the ops run allocate (not views, not in place)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.created = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.created += out.untyped_storage().data_ptr() not in storages
        return out


def test_head_gradient_is_accumulated_in_its_one_buffer(tiny_model_dir):
    """Full training: the loss's forward holds the head's gradient in one [vocab x hidden] buffer, the chunks'
    products added into it by the matrix product itself, not one more such temporary per chunk (545 MB each for
    Qwen2.5-0.5B's head in float32)."""
    model = load(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    with HeadSizedTensors(model.lm_head.weight.numel()) as tensors:
        chunked_lm_loss(hidden, model.lm_head, inputs["labels"], chunk_size=10)  # 7 chunks
    assert tensors.created == 1
