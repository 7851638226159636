"""The feature atlas: a static web page per sweep with each class's filters, their top images and their maps.

    python jobs/atlas.py --sweep runs/cifar10_resnets --output results/cifar10_resnets/atlas
    python jobs/atlas.py --sweep s3://bucket/dtd/cifar10_resnets --output atlas/ --k 10 --compare glm

Reads the sweep's trials/, decompose/maps/, records/ (the per-instance features: top images come from
one pass over them) and sweep_config.json; the images and weights its units name give the pictures and
the channel maps (left out, with the reason on the page, where they are missing). Writes index.html and
one WebP per row of images; it opens from the file system and loads nothing from the network. No Ray.
`jobs/sweep.py` writes it into <output>/atlas at the end of a sweep with a local output (`--atlas false`
skips it). `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("atlas")  # the same command as `dtd-ray atlas`
