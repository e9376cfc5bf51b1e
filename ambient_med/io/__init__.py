"""File formats: DICOM, NIfTI, the slice and measurement stores, exports, the demo cohort."""
