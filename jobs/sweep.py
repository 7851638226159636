"""The dtd-ray sweep: models × datasets × k × strategies × retrain modes, one Parquet row per trial.

    python jobs/sweep.py                                   # the quickstart preset, local Ray
    python jobs/sweep.py --config cifar10_resnets --models cifar_resnet20 --k 5
    ray job submit --working-dir . -- python jobs/sweep.py --config cifar10_resnets \
        --data_root /data --output s3://bucket/dtd/cifar10_resnets

Connects to the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), or starts
a local one. Extracts each model's records (finished partitions skipped), decomposes
them for the whole k grid, runs the retrain trials on Ray Tune and writes
<output>/trials/<trial_id>.parquet (read it with pandas.read_parquet), then prints a
summary table. A rerun resumes: finished trials are skipped. `--config` takes a preset
name or a YAML file; every other option overrides the config's value.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("sweep")  # the same command as `dtd-ray sweep`
