"""Write the web demo's bundled example light fields (``examples/``) with the synthetic generator.

Command-line shim over :func:`dataset.synthetic.examples.main` (``--help`` lists every option)."""

from dataset.synthetic.examples import main

if __name__ == "__main__":
    main()
