"""Generate the synthetic light-field referring-segmentation benchmark (Ref-UrbanLF layout).

Command-line shim over :func:`dataset.synthetic.cli.main` (``--help`` lists every option)."""

from dataset.synthetic.cli import main

if __name__ == "__main__":
    main()
