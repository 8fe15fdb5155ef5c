"""Train a torchvision Faster R-CNN on VOC-format data and compress its backbone to a FLOPs target with EDP
(Algorithm 1) or another method, or train the uncompressed baseline.

Examples:
    python tools/train_det.py --config configs/raccoon_r18_cpu_edp.yaml --data-root ../shared/data/raccoon
    python tools/train_det.py --config configs/raccoon_r18_cpu_trained.yaml --data-root ../shared/data/raccoon \
        model.weights=runs/base/model_final.pt compress.schedule.enabled=true
    python tools/train_det.py --config configs/raccoon_r18_cpu_edp.yaml --print-config method=slimming
    python tools/train_det.py --config configs/raccoon_r18_cpu_edp.yaml --output-dir runs/x --resume
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/voc07_frcnn_r50_fpn_edp.yaml \
        --data-root /data/VOCdevkit/VOC2007 model.weights_backbone=/weights/resnet50-0676ba61.pth

Writes config.yaml, log.txt, metrics_log.jsonl, checkpoints, pm_report.json + layers.txt (at the prune point),
model_final.pt and metrics.json into the output directory. A folder that holds another run is refused unless
--resume or --overwrite is given. Every key is listed in docs/CONFIG.md.
"""
import os


from edp_det.harness.cli import add_run_args, cli_main, resolve_run_config, resume_argument, tool_parser


def get_args_parser():
    return add_run_args(tool_parser(__doc__))


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
