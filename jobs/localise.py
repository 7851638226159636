"""Measure localisation: do the selected channels fire on the object? Writes <sweep>/localisation/.

    python jobs/localise.py --sweep results/cifar10_resnets --models cifar_resnet20,cifar_resnet56
    python jobs/localise.py --sweep runs/cifar10_resnets --canvas 96 --background scramble --output runs/loc96

Pastes each test image at a seeded random position on a larger canvas over another class's
blurred image, runs each model of the sweep fully convolutionally on it and scores, per
image, the true class's maps (frequency map, random channels, top-|W|, contribution, CAM,
uniform) by energy-in-box and the pointing game: localisation/<model>.parquet and
localise_config.json. `python jobs/report.py` then summarises them with intervals.
No Ray needed. `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("localise")  # the same command as `dtd-ray localise`
