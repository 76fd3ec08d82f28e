"""Released checkpoints are bf16 (or fp16): trained with float32 trainable weights they train exactly as their float32
copy, and the outputs keep the checkpoint's dtype (medicalgpt/precision.py)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import supervised_finetuning
from medicalgpt.args import LoraArguments, ModelArguments
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model
from tests.helpers import FAST_FLAGS, write_jsonl

SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16"}
QA = [(f"第{i}个问题：头痛{i}天怎么办？", f"第{i}个回答：休息，多喝水，{i}天不好就去医院。") for i in range(12)]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(
        tmp_path_factory.mktemp("precision") / "sft.jsonl", [{"instruction": q, "output": a} for q, a in QA]
    )


def copy_in(model_dir, folder, dtype):
    """`model_dir` saved in `dtype` (config.json says so, as a release's does), with its tokenizer."""
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """For bf16 and fp16: a copy of the tiny model in that dtype, and that copy's float32 copy (the same values)."""
    root = tmp_path_factory.mktemp("checkpoints")
    pairs = {}
    for name in ("bfloat16", "float16"):
        low = copy_in(tiny_model_dir, root / name, getattr(torch, name))
        pairs[name] = (low, copy_in(low, root / f"{name}-as-float32", torch.float32))
    return pairs


def train(model_dir, data, output_dir, *extra):
    argv = ["--model_name_or_path", model_dir, "--train_file_dir", str(data), "--template_name", "qwen", "--do_train",
            "--max_steps", "12", "--learning_rate", "2e-5", "--per_device_train_batch_size", "1", "--logging_steps",
            "1", "--save_strategy", "steps", "--save_steps", "12", "--output_dir", str(output_dir), *FAST_FLAGS,
            *extra]  # fmt: skip
    supervised_finetuning.main(argv)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def saved_dtypes(folder, name="model.safetensors"):
    with safe_open(folder / name, "pt") as f:
        return {f.get_slice(key).get_dtype() for key in f.keys()}


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_checkpoint_trains_as_its_float32_copy(dtype, checkpoints, sft_data, tmp_path):
    """12 full-SFT steps at lr 2e-5 on CPU (no autocast): the losses are EXACTLY equal, not merely close: the trainable
    weights are upcast to float32 before training, so both runs do the same float32 arithmetic on the same values.
    The output stays a `dtype` folder, holding the float32 run's final weights rounded to `dtype`; checkpoint-12
    keeps float32 (a resume continues from the trained weights, not their rounding)."""
    low, as_float32 = checkpoints[dtype]
    losses = train(low, sft_data, tmp_path / "low")
    assert len(losses) == 12 and losses == train(as_float32, sft_data, tmp_path / "float32")
    assert json.loads((tmp_path / "low" / "config.json").read_text())["dtype"] == dtype
    assert saved_dtypes(tmp_path / "low") == {SAFETENSORS_DTYPE[dtype]}
    assert saved_dtypes(tmp_path / "low" / "checkpoint-12") == {"F32"}
    final, reference = weights(tmp_path / "low"), weights(tmp_path / "float32")
    for name, weight in final.items():
        torch.testing.assert_close(weight, reference[name].to(weight.dtype), atol=0, rtol=0)


def test_pure_bf16_trains_the_bf16_weights_and_loses_small_updates(checkpoints, sft_data, tmp_path):
    """--pure_bf16: AdamW updates the bf16 weights themselves; the same 12 steps change fewer of them than float32
    master weights rounded at the end (74% of the weights changed in the float32 run, seen), and --save_dtype float32
    saves float32."""
    low, _ = checkpoints["bfloat16"]
    train(low, sft_data, tmp_path / "fp32-master")
    train(low, sft_data, tmp_path / "pure", "--pure_bf16", "True", "--save_dtype", "float32")
    assert saved_dtypes(tmp_path / "pure") == {"F32"}
    assert json.loads((tmp_path / "pure" / "config.json").read_text())["dtype"] == "float32"
    initial, master, pure = weights(low), weights(tmp_path / "fp32-master"), weights(tmp_path / "pure")

    def changed(trained):
        moved = sum(int((trained[name].to(weight.dtype) != weight).sum()) for name, weight in initial.items())
        return moved / sum(weight.numel() for weight in initial.values())

    assert changed(pure) < changed(master) - 0.1, (changed(pure), changed(master))


def test_lora_on_a_bf16_base_keeps_float32_adapters(checkpoints, sft_data, tmp_path):
    """Adapters and modules_to_save in float32; the frozen base left in bf16 under autocast (its memory), float32
    without (CPU: a float32 head cannot take bf16 activations). The saved adapter is float32 (peft's default, kept by
    --save_dtype auto), its modules_to_save included."""
    low, _ = checkpoints["bfloat16"]
    lora_args = LoraArguments(use_peft=True, modules_to_save="lm_head")
    for autocast, frozen_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        training_args = supervised_finetuning.SupervisedConfig(output_dir=str(tmp_path), use_cpu=True, bf16=autocast)
        model = wrap_with_lora(load_model(ModelArguments(model_name_or_path=low)), lora_args, training_args, low)
        trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad}
        assert any("modules_to_save" in name for name in trainable) and any("lora_A" in name for name in trainable)
        assert set(trainable.values()) == {torch.float32} and set(frozen.values()) == {frozen_dtype}
    train(low, sft_data, tmp_path / "lora", "--use_peft", "True", "--modules_to_save", "lm_head", "--max_steps", "1")
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        saved = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert any("lm_head" in key for key in saved) and set(saved.values()) == {"F32"}


def test_memory_of_full_training_per_parameter(checkpoints):
    """Weights + gradients + AdamW's two moments after one step: 16 bytes per parameter with float32 trainable
    weights, 8 with --pure_bf16 (the figures README gives for 0.5B and 7B models)."""
    low, _ = checkpoints["bfloat16"]
    training_args = supervised_finetuning.SupervisedConfig(output_dir="unused", use_cpu=True, bf16=False)
    per_parameter = {}
    for pure in (False, True):
        model = wrap_with_lora(load_model(ModelArguments(model_name_or_path=low)), LoraArguments(pure_bf16=pure),
                               training_args, low)  # fmt: skip
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        optimizer.step()
        parameters = list(model.parameters())
        tensors = parameters + [p.grad for p in parameters] + [
            state for p in parameters for state in optimizer.state[p].values() if state.dim() > 0
        ]  # fmt: skip
        per_parameter[pure] = sum(t.numel() * t.element_size() for t in tensors) / sum(p.numel() for p in parameters)
    assert per_parameter == {False: 16, True: 8}


def test_deepspeed_with_bf16_keeps_its_own_master_weights(checkpoints, monkeypatch):
    """DeepSpeed with bf16 keeps float32 master weights of its own and casts the module itself: nothing is upcast
    before it (a float32 copy would be cast straight back); without bf16 / fp16 ZeRO-1/2 train the module's own
    weights, which are then upcast; ZeRO-3 partitioned them at load in its own dtype."""
    import transformers.integrations

    from medicalgpt.precision import deepspeed_owns_precision

    low, _ = checkpoints["bfloat16"]

    def args(**values):
        return supervised_finetuning.SupervisedConfig(output_dir="unused", use_cpu=True, **{"bf16": False, **values})

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: False)
    assert deepspeed_owns_precision(args(bf16=True, deepspeed=None)) is False
    zero2_bf16 = args(bf16=True)
    zero2_bf16.deepspeed = "configs/ds_zero2.json"  # set after __post_init__, which would start DeepSpeed
    zero2_fp32 = args()
    zero2_fp32.deepspeed = "configs/ds_zero2.json"
    assert deepspeed_owns_precision(zero2_bf16) and not deepspeed_owns_precision(zero2_fp32)
    for training_args, dtype in ((zero2_bf16, torch.bfloat16), (zero2_fp32, torch.float32)):
        model = wrap_with_lora(load_model(ModelArguments(model_name_or_path=low)), LoraArguments(), training_args, low)
        assert {p.dtype for p in model.parameters()} == {dtype}
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    assert deepspeed_owns_precision(zero2_fp32)


def test_dpo_on_a_bf16_checkpoint_trains_as_its_float32_copy(checkpoints, tmp_path):
    """Full-parameter DPO on CPU: the reference computes in float32 like the upcast policy, so the first loss is
    exactly ln 2 (policy == reference) and every loss equals the float32 copy's (a bf16 reference gave 0.69287 at
    step 0, seen)."""
    import math

    import dpo_training
    from tests.helpers import REPO

    def losses(model_dir, output_dir):
        dpo_training.main(["--model_name_or_path", model_dir, "--train_file_dir", str(REPO / "data" / "reward"),
                           "--do_train", "--template_name", "qwen", "--max_steps", "2", "--learning_rate", "2e-5",
                           "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_strategy", "no",
                           "--output_dir", str(output_dir), *FAST_FLAGS])  # fmt: skip
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    low, as_float32 = checkpoints["bfloat16"]
    bf16_losses = losses(low, tmp_path / "bf16")
    assert bf16_losses[0] == pytest.approx(math.log(2), abs=1e-7)
    assert len(bf16_losses) == 2 and bf16_losses == losses(as_float32, tmp_path / "float32")


def test_full_ppo_on_a_bf16_checkpoint_trains_a_float32_policy_and_critic(checkpoints, monkeypatch):
    """Without LoRA the critic is trained too: float32 like the policy (it was left in bf16, losing its updates), and
    on CPU the frozen reference computes in float32 as the policy does (a KL that is not 0 at step 0 otherwise); the
    frozen reward model keeps the checkpoint's dtype."""
    from types import SimpleNamespace

    from medicalgpt.args import RLArguments
    from medicalgpt.rl import build

    low, _ = checkpoints["bfloat16"]
    monkeypatch.setattr(build, "PPOTrainer", lambda config, **models: models)
    config = SimpleNamespace(bf16=False, fp16=False, deepspeed=None, gradient_checkpointing=False)
    run = build.RLRun(config, ModelArguments(model_name_or_path=low), LoraArguments(),
                      RLArguments(reward_model_path=low), AutoTokenizer.from_pretrained(low), [], [])  # fmt: skip
    models = build.build_ppo_trainer(run, train_prompts=None, eval_prompts=None)

    def dtypes(model):
        return {p.dtype for p in model.parameters()}

    assert dtypes(models["policy"]) == dtypes(models["critic"]) == dtypes(models["ref_policy"]) == {torch.float32}
    assert dtypes(models["reward_model"]) == {torch.bfloat16}
    assert all(p.requires_grad for p in models["critic"].parameters())
