"""Pack an image folder into Parquet shards of encoded images, read back as parquet:DST.

    python jobs/pack.py --dataset imagefolder:SRC --output DST [--rows_per_file 1000]

SRC and DST are local folders or s3:// prefixes. Writes DST/split=<split>/part-NNNNN.parquet
(sample_id, label, class_name, rel_path, image_bytes) and DST/_classes.json last; a rerun writes
only the shards still missing. `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("pack")  # the same command as `dtd-ray pack`
