# results/report.html: `snakemake --report results/report.html` gathers the tables and plots marked
# with report(...) (captions in workflow/report/). After a successful run that built them, the
# workflow writes it itself (config key `report: false` turns that off).


onsuccess:
    if report_outdated():
        write_report()
