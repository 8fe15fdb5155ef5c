"""Compress (or train a baseline) torchvision Faster R-CNN on VOC-format data with EDP (Algorithm 1).

    python tools/train_det.py --config configs/raccoon_frcnn_r50_edp.yaml [--data-root DIR] [--output-dir DIR]
                              [--resume | --resume-from CKPT] [--print-config]
                              [key=value ...]

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N tools/train_det.py ...`` (nccl on GPU, gloo on CPU).
Writes config.yaml, metrics_log.jsonl, checkpoints, pm_report.json + layers.txt (at PM), model_final.pt,
metrics.json into the output directory.
"""
import argparse
import os


from edp_det.harness.cli import add_run_args, cli_main, resolve_run_config, resume_argument


def get_args_parser():
    return add_run_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))


def main(args):
    from edp_det.train.detection import DetectionTask
    from edp_det.runtime.distributed import get_rank
    from edp_det.train.engine import Trainer
    from edp_det.runtime.logs import setup_logging
    from edp_det.runtime.rundir import check_run_dir

    cfg, out = resolve_run_config(args, "detection")
    resume = resume_argument(args)
    check_run_dir(out, resume=bool(resume), overwrite=args.overwrite)   # before log.txt is opened there
    setup_logging(out, rank=int(os.environ.get("RANK", get_rank())), level=args.log_level)
    return Trainer(cfg, DetectionTask(cfg), out, resume=resume, overwrite=args.overwrite).run()


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "train_det")
