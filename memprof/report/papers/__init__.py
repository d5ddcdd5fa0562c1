"""The papers' memory tables set against memprof's measurements: the data (``model``, the paper
modules, ``catalog``), the comparison (``compare``) and the files (``render``). Measuring lives in
``memprof.papers``; nothing here measures."""
