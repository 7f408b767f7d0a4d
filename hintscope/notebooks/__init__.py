"""The report notebook (papermill-parameterised: bundle, baseline); see hintscope.report.render."""
