# results/report.html: `snakemake --report results/report.html` gathers the tables and plots marked
# with report(...) (captions in workflow/report/). After a successful run that built them, the
# workflow writes it itself (config key `report: false` turns that off): workflow/scripts/html_report.py.


onsuccess:
    html_report.write_report_if_outdated(workflow, config, [*TABLES, *PLOTS, *SENSITIVITY_OUTPUTS, RUNS_CSV], REPORT_HTML, f"{LOGS}/report.log")
