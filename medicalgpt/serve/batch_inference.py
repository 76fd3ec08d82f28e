"""inference.py's batch mode: a file of prompts checked, answered in batches and written in input order, by one
process, by torchrun's ranks each answering a contiguous share (rank 0 gathers and writes), or by vLLM."""

import json
import logging
import os
from datetime import timedelta

from tqdm import tqdm

from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.model.loader import load_tokenizer
from medicalgpt.serve.chat import tokenizer_source
from medicalgpt.templates import build_template

logger = logging.getLogger("medicalgpt")


def check_prompts(engine, items, path, max_new_tokens):
    """Every prompt renders and fits the context; else all problems as path:line errors."""
    errors = []
    for line, _, messages in items:
        try:
            engine.check_length(len(engine.encode(messages)), max_new_tokens)
        except ValueError as error:
            errors.append(Issue(path, line, "error", "prompt", str(error)))
    if errors:
        raise DataValidationError(errors)


def answer_lines(engine, items, options, batch_size, progress=True):
    """The output line of each item (its record plus `output`), generated in batches of `batch_size`."""
    lines = []
    for start in tqdm(range(0, len(items), batch_size), desc="Generating", unit="batch", disable=not progress):
        batch = items[start : start + batch_size]
        completions = engine.generate([messages for _, _, messages in batch], options)
        for (_, record, _), completion in zip(batch, completions):
            lines.append(json.dumps({**record, "output": completion.text}, ensure_ascii=False) + "\n")
    return lines


def write_lines(output_file, lines):
    """All lines to a temporary file, renamed when complete: no half-written output."""
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    partial = output_file + ".partial"
    with open(partial, "w", encoding="utf-8") as out:
        out.writelines(lines)
    os.replace(partial, output_file)


def run_batch(engine, items, options, output_file, batch_size):
    """Answer `items` in batches and write them in input order."""
    write_lines(output_file, answer_lines(engine, items, options, batch_size))


def world_size():
    """Processes started by torchrun (WORLD_SIZE), 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items, rank, world):
    """Rank `rank`'s contiguous share: the shards of ranks 0..world-1 joined are `items`, sizes differing by <= 1."""
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def run_distributed_batch(engine, items, options, output_file, batch_size):
    """Under torchrun: each rank answers its shard; rank 0 gathers them in rank order (= input order) and writes."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = shard(items, rank, world)
    first = rank * len(items) // world
    logger.info("Rank %d of %d answers prompts %d-%d of %d", rank, world, first + 1, first + len(mine), len(items))
    lines = answer_lines(engine, mine, options, batch_size, progress=rank == 0)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(lines, gathered, dst=0)
    if rank == 0:
        write_lines(output_file, [line for part in gathered for line in part])
    dist.barrier()  # the file is complete when any rank exits
    dist.destroy_process_group()


def init_process_group():
    """The ranks' process group (gloo: it only carries the answers; the models need no collective)."""
    import torch.distributed as dist

    # Ranks with unequal shards wait for the slowest at the gather: allow a long generation.
    dist.init_process_group("gloo", timeout=timedelta(hours=24))


def run_vllm_batch(chat_args, items, output_file):
    """Batch mode on vLLM: the same templates and stop token, vLLM's continuous batching."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as error:
        raise UsageError("--use_vllm needs vLLM (a CUDA machine): pip install vllm") from error

    source = tokenizer_source(chat_args)
    template = build_template(chat_args.template_name, load_tokenizer(chat_args.model_arguments(), source))
    prompts = ["".join(p + r for p, r in template.render_turns(m, chat_args.system_prompt)) for _, _, m in items]
    llm = LLM(model=chat_args.base_model, tokenizer=source, enable_lora=bool(chat_args.lora_model))
    params = SamplingParams(
        temperature=chat_args.temperature,
        top_p=chat_args.top_p if chat_args.temperature > 0 else 1.0,
        max_tokens=chat_args.max_new_tokens,
        repetition_penalty=chat_args.repetition_penalty,
        stop=[template.stop_str],
    )
    lora = LoRARequest("adapter", 1, chat_args.lora_model) if chat_args.lora_model else None
    outputs = llm.generate(prompts, params, lora_request=lora)
    lines = [
        json.dumps({**record, "output": result.outputs[0].text}, ensure_ascii=False) + "\n"
        for (_, record, _), result in zip(items, outputs)
    ]
    write_lines(output_file, lines)
