"""One module per Snakemake rule: each reads its inputs, calls the libraries, writes outputs."""
