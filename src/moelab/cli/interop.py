"""`moelab export`, `import`, `upcycle` and `consolidate`."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's model (its newest checkpoint, or the checkpoint given) as a Hugging Face
    checkpoint: config.json, model.safetensors (sharded with an index above --max-shard-size),
    generation_config.json and the tokenizer files, loadable with
    transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT_DIR) and no custom code.
    The architecture follows the model: llama (dense), mixtral (every layer MoE, renormalised top-k,
    no shared expert), qwen2_moe (shared experts, dense layers, qkv bias or no renormalisation),
    qwen3_moe (model.qk_norm = "head"), olmoe (model.qk_norm = "full"). Settings no architecture can
    express (expert-choice routing, capacity-based token dropping, sigmoid scoring, a selection bias in
    use) are refused, naming the setting."""
    from moelab.interop.export import export_hf
    from moelab.interop.weights import parse_size

    result = export_hf(
        args.run, args.out, arch=args.arch, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size)
    )
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported {args.run} as {result.architecture} to {result.out_dir} ({', '.join(result.files)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a Hugging Face checkpoint from a local directory (never the network) as a moelab run
    that generate, export and upcycle read like any run (its checkpoint is step 0, weights only).
    Supported: llama, mixtral, qwen2_moe, qwen3_moe and olmoe checkpoints in safetensors format with
    a tokenizer.json; anything moelab cannot compute exactly (rotary scaling, sliding windows, biases
    it lacks, quantisation, ...) is refused naming the file and the setting. The run keeps the
    checkpoint's own tokenizer and special tokens (eval and train need data tokenised with it: see
    docs/interop.md)."""
    from moelab.interop.importer import import_hf

    result = import_hf(args.hf_dir, args.out, max_seq_len=args.max_seq_len)
    print(
        f"imported {args.hf_dir} ({result.architecture}, {result.params:,} parameters, "
        f"{result.tokenizer_vocab:,}-token vocabulary) as run {result.run_dir}"
    )
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    """Sparse upcycling: turn a dense run into a mixture of experts that starts equal to it. Every
    expert is a copy of the dense FFN (--granularity 1) or one of G fine-grained pieces of it (E/G
    copies of each piece); the router starts so each token takes whole copies (top-k a multiple of
    G) with weights that sum to one copy. Then train it: moelab train --out OUT_RUN --resume
    (--set train.max_steps=N and other train.* settings may change there)."""
    from moelab.interop.upcycle import upcycle

    result = upcycle(args.dense_run, args.out, args.experts, args.top_k, args.granularity, args.overrides)
    print(
        f"upcycled {args.dense_run} into {result.experts} experts of hidden {result.expert_hidden} "
        f"(top-k {result.top_k}, granularity {result.granularity}) in {result.run_dir}; "
        f"max |logit difference| from the dense model at step 0: {result.max_logit_diff:.2e}"
    )
    print(f"train it with: moelab train --out {result.run_dir} --resume")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Turn a sharded checkpoint (train.checkpoint_format = "sharded": every FSDP process wrote its
    own shards with torch.distributed.checkpoint) into the single-process format: a new run
    directory OUT_RUN, a copy of the run's files whose only checkpoint is that step's, with full
    weights in model.safetensors and the full optimizer state in trainer.pt. export, generate, eval
    and a resume at any world size read it (a resume under FSDP reads sharded checkpoints too)."""
    from moelab.distributed.sharded import consolidate

    path = consolidate(args.checkpoint, args.out)
    print(f"consolidated {args.checkpoint} into {path}")
    return 0


def register(sub, command) -> None:
    """Add this subsystem's subcommands to the `moelab` parser."""
    p = command(sub, "export", cmd_export, "write a run as a Hugging Face checkpoint (transformers, vLLM)")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (its newest checkpoint) or one of its checkpoints")
    p.add_argument("out", metavar="OUT_DIR", help="new (or empty) output directory")
    p.add_argument(
        "--arch",
        choices=["llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"],
        help="architecture to write (default: chosen from the model)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights"
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest weight file before sharding (e.g. 5GB, 500MB, 2GiB)"
    )

    p = command(sub, "consolidate", cmd_consolidate, "write a sharded checkpoint in the single-process format")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a sharded checkpoint directory, or a run (its newest)")
    p.add_argument("out", metavar="OUT_RUN", help="new (or empty) run directory")

    p = command(sub, "import", cmd_import, "import a local Hugging Face checkpoint as a moelab run")
    p.add_argument(
        "hf_dir", metavar="HF_DIR", help="a local directory with config.json, safetensors weights and tokenizer.json"
    )
    p.add_argument("out", metavar="OUT_RUN_DIR", help="new (or empty) run directory")
    p.add_argument(
        "--max-seq-len", type=int, help="context length to keep (default: config.json's max_position_embeddings)"
    )

    p = command(sub, "upcycle", cmd_upcycle, "turn a dense run into an MoE that starts equal to it")
    p.add_argument("dense_run", metavar="DENSE_RUN", help="a dense run directory (its newest checkpoint) or checkpoint")
    p.add_argument("out", metavar="OUT_RUN", help="new (or empty) run directory")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer (E, a multiple of G)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (k, a multiple of G)")
    p.add_argument(
        "--granularity", type=int, default=1, help="split the FFN into G experts of hidden H/G (default 1: copies)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a model.moe.*, train.* or monitor.* setting (repeatable)",
    )
