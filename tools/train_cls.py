"""Train a torchvision ResNet classifier on ImageFolder data and compress it to a FLOPs target with EDP
(Algorithm 1) or another method, or train the uncompressed baseline.

Examples:
    python tools/train_cls.py --config configs/imagenet_r50_edp.yaml --data-root /data/imagenet
    python tools/train_cls.py --config configs/tiny_imagefolder.yaml --data-root DIR --print-config
    torchrun --nproc_per_node=8 tools/train_cls.py --config configs/imagenet_r50_edp.yaml --data-root /data/imagenet

Data: DIR/train/<class>/* and DIR/val/<class>/* (ImageNet val sorted into class folders); train.batch_size is per
process. Writes config.yaml, log.txt, metrics_log.jsonl, checkpoints, pm_report.json + layers.txt (at the prune
point), model_final.pt and metrics.json (top1, top5, params, flops, r_params, r_flops) into the output directory.
model_final.pt (or any checkpoint) can seed a detector: model.backbone_checkpoint=PATH in tools/train_det.py.
"""
import os


from edp_det.harness.cli import add_run_args, cli_main, resolve_run_config, resume_argument, tool_parser


def get_args_parser():
    return add_run_args(tool_parser(__doc__),
                        data_help="ImageFolder root holding train/ and val/ (overrides data.root)")


def main(args):
    from edp_det.train.classification import ClassificationTask
    from edp_det.runtime.distributed import get_rank
    from edp_det.train.engine import Trainer
    from edp_det.runtime.logs import setup_logging
    from edp_det.runtime.rundir import check_run_dir

    cfg, out = resolve_run_config(args, "classification")
    resume = resume_argument(args)
    check_run_dir(out, resume=bool(resume), overwrite=args.overwrite)   # before log.txt is opened there
    setup_logging(out, rank=int(os.environ.get("RANK", get_rank())), level=args.log_level)
    return Trainer(cfg, ClassificationTask(cfg), out, resume=resume, overwrite=args.overwrite).run()


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "train_cls")
