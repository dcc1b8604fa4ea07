{#
    Write-audit-publish of event_stats.

    int_event_stats__audit (write) builds the processed dates' new stats as a table of its own,
    audit.event_stats__<start>_<end> (audit.event_stats__all without vars); its data tests (audit)
    run before event_stats, which depends on it, and a failing one makes dbt skip event_stats;
    event_stats (publish) replaces the processed dates with the audited rows, writes
    ops.build_log and drops the audit table, all in one transaction.

    One table per date range (and per var audit_key when given): concurrent builds of different
    ranges never read or replace each other's audit table, and a build publishes exactly the rows
    its tests passed. The table exists
    only between its build and its publish (or, renamed <name>__failed, after a failed audit).
#}

{#
    The audit table's name for the processed dates: event_stats__20240301_20240302, or
    event_stats__all without vars. The optional var audit_key (e.g. the Airflow run id) adds a
    digest of it, event_stats__20240301_20240302__1a2b3c4d, so that two runs of the same dates at
    once (a daily run and a one-day backfill) do not share one either.
#}
{% macro event_stats_audit_alias() -%}
    {%- set date_range = processed_date_range() -%}
    {%- if date_range is none -%}
        {%- set name = 'event_stats__all' -%}
    {%- else -%}
        {%- set name = 'event_stats__' ~ date_range.start | replace('-', '') ~ '_'
            ~ date_range.end | replace('-', '') -%}
    {%- endif -%}
    {%- set audit_key = var('audit_key', none) -%}
    {%- if audit_key is not none and audit_key | string | trim != '' -%}
        {%- set name = name ~ '__' ~ local_md5(audit_key | string)[:8] -%}
    {%- endif -%}
    {{ return(name) }}
{%- endmacro %}


{#
    Whether this build's publish already committed: its audit table is gone and ops.build_log
    holds a row of this audit_key for every processed date. An Airflow retry of the publish task
    after its commit (a worker killed before it reported success) then republishes the
    published rows instead of failing for want of an audit table, provided they still match
    raw.events (require_audit_matches_raw), and writes no second ledger row. Only with var
    audit_key and dates: a build without a key cannot tell its own publish from another's, and
    a build without dates must make the whole table equal to raw from a fresh audit.
#}
{% macro already_published() -%}
    {%- set audit_key = var('audit_key', none) -%}
    {%- if not execute or audit_key is none or audit_key | string | trim == '' -%}
        {{ return(false) }}
    {%- endif -%}
    {%- if load_relation(ref('int_event_stats__audit')) is not none -%}
        {{ return(false) }}
    {%- endif -%}
    {%- set log = build_log_relation() -%}
    {%- if load_relation(log) is none
        or 'audit_key' not in adapter.get_columns_in_relation(log) | map(attribute='name') -%}
        {{ return(false) }}
    {%- endif -%}
    {%- set date_range = processed_date_range() -%}
    {%- if date_range is none -%}
        {{ return(false) }}
    {%- endif -%}
    {%- set query -%}
        select
            count(distinct event_date) as logged,
            date_diff('day', date '{{ date_range.start }}', date '{{ date_range.end }}') as wanted
        from {{ log }}
        where audit_key = '{{ audit_key | replace("'", "''") }}'
            and {{ processed_dates_filter('event_date') }}
    {%- endset -%}
    {%- set row = run_query(query).rows[0] -%}
    {{ return(row[0] > 0 and row[0] >= row[1]) }}
{%- endmacro %}


{#
    Pre-hook of event_stats: refuse to publish without an audit table, with the command that
    makes one (e.g. event_stats built alone after an earlier build published and dropped it, or
    after its audit failed), unless this build's publish already committed (already_published).
#}
{% macro require_audited_stats() -%}
    {%- set audited = ref('int_event_stats__audit') -%}
    {%- if execute and load_relation(audited) is none -%}
        {%- set date_range = processed_date_range() -%}
        {%- set dates = 'every date' if date_range is none
            else date_range.start ~ ' to ' ~ date_range.end ~ ' (end excluded)' -%}
        {%- if already_published() -%}
            {{ log('The stats of ' ~ dates ~ ' audited by ' ~ var('audit_key')
                ~ ' were already published: published again unchanged.', info=true) }}
        {%- else -%}
            {{ exceptions.raise_compiler_error(
                "No audited stats to publish for " ~ dates ~ ": " ~ audited ~ " does not exist "
                ~ "(already published, or its audit failed). Build and test them first: "
                ~ "dbt build --select int_event_stats__audit+ with the same vars."
            ) }}
        {%- endif -%}
    {%- endif -%}
{%- endmacro %}


{#
    Pre-hook of event_stats, inside the publish's transaction: refuse audited stats that no
    longer match raw.events. An audit table built before raw changed (a cleared or retried
    publish task running after another run reloaded the date) passed its tests on the old
    events; publishing it would make the stats disagree with raw. The check recounts the
    processed dates exactly as int_event_stats__audit counts them and compares row for row.
    A republish (already_published) compares the published rows instead: a run's publish
    retried after raw changed is refused, never a way to put back or confirm stale stats.
#}
{% macro require_audit_matches_raw() -%}
    {%- set republish = already_published() -%}
    {%- set audited = this if republish else ref('int_event_stats__audit') -%}
    {%- set dates = processed_dates_filter('event_date') -%}
    with audited as (
        select event_date, user_id, event_count from {{ audited }} where {{ dates }}
    ),
    recounted as (
        select event_date, user_id, count(*) as event_count
        from {{ ref('stg_events__events') }}
        where {{ dates }}
        group by event_date, user_id
    ),
    differences as (
        (select * from audited except all select * from recounted)
        union all
        (select * from recounted except all select * from audited)
    )
    select error(
        {% if republish -%}
            'The stats in {{ audited }} that run {{ var("audit_key") | replace("'", "''") }} '
            || 'published no longer match raw.events for '
        {%- else -%}
            'Audited stats in {{ audited }} no longer match raw.events for '
        {%- endif %}
        || string_agg(distinct cast(event_date as varchar), ', ' order by cast(event_date as varchar))
        || ': raw changed after the audit, so they were not published. Build and test them '
        || 'again: dbt build --select int_event_stats__audit+ with the same vars.'
    )
    from differences
    having count(*) > 0
{%- endmacro %}


{# Post-hook of event_stats, inside the publish's transaction: the audit table is consumed
(already gone when the build republished, see already_published). #}
{% macro drop_audited_stats() -%}
    drop table if exists {{ ref('int_event_stats__audit') }}
{%- endmacro %}


{#
    on-run-end: when a test of the audit table failed (or errored) in this invocation, rename the
    table to <name>__failed, replacing an older one. Under its own name it would be published by
    the next build of event_stats alone (an Airflow retry or clear of that task); renamed, it stays
    for inspection and that build refuses (require_audited_stats).
#}
{% macro quarantine_failed_audit(results) -%}
    {%- set audit_id = 'model.' ~ project_name ~ '.int_event_stats__audit' -%}
    {%- set failed = [] -%}
    {%- for result in results
        if result.node.resource_type == 'test'
        and result.status in ('fail', 'error')
        and audit_id in result.node.depends_on.nodes -%}
        {%- do failed.append(result.node.name) -%}
    {%- endfor -%}
    {%- if failed -%}
        {%- set audit_node = graph.nodes[audit_id] -%}
        {%- set audited = adapter.get_relation(
            database=audit_node.database, schema=audit_node.schema,
            identifier=audit_node.alias) -%}
    {%- endif -%}
    {#- No table: its tests errored because it was never built (or already published). -#}
    {%- if failed and audited is not none -%}
        {%- set quarantined = audited.incorporate(path={'identifier': audit_node.alias ~ '__failed'}) -%}
        {{ log('Audit failed (' ~ failed | join(', ') ~ '): ' ~ audited ~ ' kept as '
            ~ quarantined ~ ', not published.', info=true) }}
        drop table if exists {{ quarantined }};
        alter table {{ audited }} rename to {{ adapter.quote(quarantined.identifier) }};
    {%- endif -%}
{%- endmacro %}


{#
    `where: "__processed_dates__"` in a test's config (dbt_project.yml sets it for the staging
    tests) scopes the test to the processed dates of event_date: a daily build's tests read one
    partition, and a bad row of another date does not fail it. A test's `where` cannot call a
    macro itself (yml configs are rendered without the project's macros), hence the placeholder.
#}
{% macro duckdb__get_where_subquery(relation) -%}
    {%- set where = config.get('where', '') -%}
    {%- if where -%}
        {%- set where = where | replace('__processed_dates__', processed_dates_filter('event_date')) -%}
        {%- set filtered -%}
            (select * from {{ relation }} where {{ where }}) as dbt_subquery
        {%- endset -%}
        {{ return(filtered) }}
    {%- endif -%}
    {{ return(relation) }}
{%- endmacro %}
