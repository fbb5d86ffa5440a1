"""Will it fit? The memory a run needs per device, part by part, before it allocates any, and the cheapest
changes that make it fit when it does not. It reads the same recipe JSON and flags as the entry scripts.

    python tools/plan_memory.py configs/glm-large-chinese.json --task finetune
    python tools/plan_memory.py configs/glm-10b-chinese-lora.json --task finetune --gpu true --devices 4 --device_memory 32
    python tools/plan_memory.py --task predict --model_name_or_path THUDM/glm-10b-chinese --num_beams 5 --gpu true --device_memory 24
    python tools/plan_memory.py configs/tiny-pretrain.json --task pretrain --output_file plan.json

--task finetune, cloze and pretrain take finetune_generation.py's, finetune_cloze.py's and pretrain_glm.py's
flags, predict takes predict_generation.py's (server.py decodes as predict does). The model is a checkpoint
directory's config.json or one of THUDM's names (their shapes are built in: nothing is downloaded). Without
--device_memory the device is this machine's (its GPU's free memory, or the CPU's available memory).
--output_file writes the plan as JSON: per_device_gib, fits, the parts and the suggestions. The accounting
is glm/memory/estimate.py's; bench/memory.py measures it.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from glm.cli.arguments import ArgumentParser, switch  # noqa: E402
from glm.cli.console import say  # noqa: E402
from glm.cli.process import command  # noqa: E402
from glm.errors import UserError  # noqa: E402
from glm.files import write_json_atomic  # noqa: E402
from glm.memory.estimate import GIB  # noqa: E402
from glm.memory.measure import available_memory_bytes, current_memory_bytes, on_gpu  # noqa: E402
from glm.memory.plan import sharding_stage, suggestions, table  # noqa: E402

TASKS = ("finetune", "cloze", "pretrain", "predict")


def planning_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("--task", choices=TASKS, default="finetune", help="which entry script's run to plan")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel (or sharding) devices of the run")
    parser.add_argument("--device_memory", type=float, help="GiB per device (default: this machine's available)")
    parser.add_argument("--gpu", type=switch, nargs="?", const=True, default=None,
                        help="plan for GPUs (default: what this machine has)")
    parser.add_argument("--output_file", help="write the plan here as JSON")
    return parser


def training_plan(task_name, argv, devices, gpu):
    """Parse `argv` as the task's entry script does and plan its run."""
    if not any(arg.split("=")[0] == "--output_dir" for arg in argv):
        argv = argv + ["--output_dir", os.path.join(tempfile.gettempdir(), "glm-memory-plan")]  # never written
    if task_name == "finetune":
        import finetune_generation as script

        parsed = script.parse_generation_arguments(argv)
        task = script.GenerationTask(*parsed)
    elif task_name == "cloze":
        import finetune_cloze as script
        from glm.understanding.cloze import ClozeTask

        parsed = script.parse_cloze_arguments(argv)
        model_args, data_args, ptuning_args, training_args = parsed
        task = ClozeTask(model_args, data_args, training_args, ptuning_args=ptuning_args)
    else:
        import pretrain_glm as script
        from glm.pretraining.pretrain import PretrainingTask

        parsed = script.parse_pretraining_arguments(argv)
        model_args, corpus_args, objective_args, training_args = parsed
        task = PretrainingTask(model_args, corpus_args, objective_args, training_args, stream=None)
    from glm.training.task import memory_plan

    task.prepare() if task_name == "finetune" else None  # the decoding flags the evaluation uses
    args = task.training_args
    half = gpu and (args.fp16 or args.bf16) and args.fp16_opt_level == "O2"  # on a CPU the run is float32
    plan = memory_plan(task, half, devices, sharding_stage(parsed.argv), gpu)
    if plan is None:
        raise UserError(f"{task.model_args.model_name_or_path}: no config.json to read the model's shape from")
    return plan


def decoding_plan_of(argv, gpu):
    import predict_generation as script
    from glm.generation import rows_per_source
    from glm.memory.estimate import DecodingLoad
    from glm.memory.plan import decoding_plan
    from glm.memory.shapes import model_shape

    args, generation_args = script.parse_arguments(argv)
    shape = model_shape(args.model_path(script.DEFAULT_MODEL))
    rows = rows_per_source(generation_args.config(args.tgt_length))
    return decoding_plan(DecodingLoad(shape, args.batch_size, args.src_length, args.tgt_length, rows,
                                      half=args.dtype != "float32", gpu=gpu))


def describe_load(load) -> str:
    shape = load.shape
    model = f"{shape.num_layers} layers x {shape.hidden_size}"
    if hasattr(load, "scored"):
        extras = [name for name, on in (("recompute", load.recompute), ("fp16/bf16 O2", load.half),
                                        (f"LoRA rank {load.lora_rank}", load.lora_rank),
                                        (f"sharding stage {load.sharding_stage}", load.sharding_stage)) if on]
        return (f"training {model}, micro-batch {load.batch} x {load.length} tokens ({load.scored} scored)"
                + "".join(f", {extra}" for extra in extras))
    return (f"{'evaluation ' if hasattr(load, 'rows_per_source') else ''}decoding {load.batch} sources of "
            f"{load.src_length} + {load.tgt_length} tokens, {load.rows_per_source} rows each")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with command():
        if "-h" in argv or "--help" in argv:
            planning_parser().print_help()
            return None
        own, rest = planning_parser().parse_own(argv)
        gpu = on_gpu() if own.gpu is None else own.gpu
        if own.devices < 1:
            raise UserError(f"--devices must be at least 1; got {own.devices}")
        plan = decoding_plan_of(rest, gpu) if own.task == "predict" else training_plan(own.task, rest, own.devices, gpu)
        if own.device_memory is not None:
            device, where = int(own.device_memory * GIB), f"--device_memory {own.device_memory:g}"
        else:
            available = available_memory_bytes()
            device = (available or 0) + current_memory_bytes()
            where = "this machine's GPU, free" if on_gpu() else "this machine's available memory"
        estimate = plan.estimate
        fits = estimate.peak <= device
        loads = [load for load in (plan.training, plan.evaluation, plan.decoding) if load is not None]
        say(f"plan     {own.task} on {own.devices} {'GPU' if gpu else 'CPU'} device{'s' if own.devices > 1 else ''}: "
            + "; ".join(describe_load(load) for load in loads))
        for line in table(estimate):
            say(line)
        say(f"device   {device / GIB:.2f} GiB ({where}): {'fits' if fits else 'does NOT fit'}")
        changes = [] if fits else suggestions(plan, device)
        for change in changes:
            verdict = "fits" if change.estimate.peak <= device else "still too much"
            same = "same result" if change.keeps_result else "changes the training"
            say(f"  {change.flags}: {change.estimate.gib():.2f} GiB ({verdict}; {same})")
        if own.output_file:
            write_json_atomic(own.output_file, dict(
                estimate.to_json(), task=own.task, devices=own.devices, gpu=gpu, device_gib=round(device / GIB, 3),
                fits=fits, suggestions=[{"flags": c.flags, "per_device_gib": round(c.estimate.gib(), 3),
                                         "fits": c.estimate.peak <= device, "same_result": c.keeps_result}
                                        for c in changes]))  # fmt: skip
        return estimate


if __name__ == "__main__":
    main()
