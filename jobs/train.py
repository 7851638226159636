"""Train a CIFAR-style ResNet on a dataset source; writes a checkpoint and its record.

    python jobs/train.py --model cifar_resnet20 --dataset fashion-mnist --epochs 15 \
        --output results/backbones

Runs as a Ray task (on a GPU when the cluster has one) or, with `--ray false`, in this
process. The checkpoint loads with `get_backbone(model, weights=<path>)`. `--help`
lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("train")  # the same command as `dtd-ray train`
