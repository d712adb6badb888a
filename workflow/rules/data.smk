rule data:
    output:
        train=str(P.train),
        test=str(P.test),
    conda:
        conda_env("data")
    threads: threads("data")
    resources:
        **job_resources("data"),
    log:
        str(P.logs("data")),
    shell:
        rlhf("data")
