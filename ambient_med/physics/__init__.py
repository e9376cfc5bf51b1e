"""MRI physics: undersampling masks and measurement operators. No network, no files."""
