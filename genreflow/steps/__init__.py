"""The pipeline's steps, one module each: what the KFP component, `genreflow <step>` and the
Python API all call, so a step behaves the same whichever way it runs.

download -> pack -> (embed -> head, or fold) per fold -> report, inside run's open and
close. Retry, reuse, failure records and tracking live here, once (genreflow.steps.fold);
below are the library functions that do the work and genreflow.tracking, which only talks
to MLflow. Every step is one public function with typed arguments; an empty tracking URI
means no MLflow.
"""
