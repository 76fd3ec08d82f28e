"""The chunked loss equals transformers' plain loss, in value and gradients; --use_liger_kernel fails clearly."""

import pytest
import torch
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


def projected_rows(model, inputs, chunk_size):
    """Rows the LM head projects, call by call, in the chunked loss's forward and backward."""
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape[0]))
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    chunked_lm_loss(hidden, model.lm_head, inputs["labels"], chunk_size=chunk_size).backward()
    return rows


def test_chunked_loss_never_projects_more_than_a_chunk(tiny_model_dir):
    model = load(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    rows = projected_rows(model, inputs, chunk_size=10)
    learned = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    # prompts never projected; backward recomputes every chunk but the last, whose logits it frees first
    assert learned == 69 and rows == [10] * 6 + [9] + [10] * 6


def test_learned_tokens_in_one_chunk_are_projected_once(tiny_model_dir):
    model = load(tiny_model_dir)
    rows = projected_rows(model, batch(model.config.vocab_size), chunk_size=1000)
    assert rows == [69]  # no recomputation in backward


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
