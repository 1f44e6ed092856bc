"""iqstar.py's --report-to: each epoch's record, as metrics.jsonl has it, also to TensorBoard or Weights & Biases.

iqstar.py imports this file only when --report-to is given; copy it beside iqstar.py to keep the flag.
"""

import os


def open_tracker(args):
    """log(record) to TensorBoard (OUTPUT_DIR/runs) or Weights & Biases, by their own writers; both end at exit."""
    if args.report_to == "wandb":  # WANDB_MODE=offline keeps the run in OUTPUT_DIR/wandb
        import wandb

        run = wandb.init(project="iqstar", dir=args.output_dir, config=vars(args))
        return lambda record: run.log(record, step=record["epoch"])
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(args.output_dir, "runs"))

    def log(record):
        for key, value in record.items():
            writer.add_scalar(key, value, record["epoch"])
        writer.flush()

    return log
