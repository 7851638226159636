"""Extract per-instance features and ranked top-k indices to Parquet records.

    python jobs/extract.py --model cifar_resnet20 \
        --weights ../shared/data/cifar_resnets/resnet20-12fca82f.th \
        --dataset imagefolder:../shared/data/cifar10 --output runs/cifar10

Connects to the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), or
starts a local one. Writes <output>/records/model=<tag>/split=<split>/ and a
manifest per partition; a rerun skips finished partitions. `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("extract")  # the same command as `dtd-ray extract`
