"""The sweep report: report.md with tables and plots/*.png from a sweep's output folder.

    python jobs/report.py --sweep runs/quickstart
    python jobs/report.py --sweep runs/cifar10_resnets --output results/cifar10_resnets

Reads trials/, decompose/analysis/ and decompose/maps/ and the resolved
sweep_config.json; draws accuracy against k (one line per strategy), the gap to the
full head and Ψ against depth, retraining recovery, head cost, and class-specific
activation maps (needs the models' weights and the test images; skipped with a
reason where they are missing). No Ray needed. `jobs/sweep.py` runs it at the end of
every sweep with a local output. `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("report")  # the same command as `dtd-ray report`
