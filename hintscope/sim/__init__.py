"""Protocol simulator: precopy migration + free page hinting with ground truth (``hintscope simulate``).

``model`` is the discrete-event model, ``variants`` the designs it can run, ``write`` turns a run
into bundle tables (or an in-memory bundle), ``confusion`` scores the detector against the truth.
"""
