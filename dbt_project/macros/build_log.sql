{#
    ops.build_log: one row per processed date per build of event_stats, the ledger that says a
    date's stats were built (send-stats refuses a date without one; status reads it).

        event_date DATE, invocation_id VARCHAR, users BIGINT, events BIGINT, built_at TIMESTAMP,
        audit_key VARCHAR (var audit_key, the Airflow run id; null without it)

    users and events are what event_stats holds for the date after the build (0 and 0 for a date
    with no events). With vars the dates are [start_date, end_date), every one of them; without
    vars every date of raw.events plus every date that vanished from it (its stats removed).

    Written by event_stats' post-hook, which dbt-duckdb's incremental materialization runs after
    the publish and before its COMMIT: the ledger rows and the stats commit together or not at all.
    The dates replaced by a build without vars are known only before the publish, so the pre-hook
    keeps them in a temporary table (private to the connection) for the post-hook.
#}

{% macro build_log_relation() -%}
    {{ return(api.Relation.create(database=this.database, schema='ops', identifier='build_log')) }}
{%- endmacro %}


{# Pre-hook of event_stats (inside its transaction): the dates it is about to replace. #}
{% macro remember_replaced_dates() -%}
    {%- if processed_date_range() is none -%}
        {%- set existing = load_relation(this) -%}
        create or replace temp table event_stats__replaced_dates as
        {% if existing is none -%}
            select cast(null as date) as event_date where false
        {%- else -%}
            select distinct event_date from {{ existing }}
        {%- endif %}
    {%- endif -%}
{%- endmacro %}


{# Post-hook of event_stats (inside its transaction, after the publish). A republish of what
this run already published (already_published) changes no table, the ledger included. #}
{% macro write_build_log() -%}
    {%- if already_published() -%}
        {{ return('select 1') }}
    {%- endif -%}
    {%- set date_range = processed_date_range() -%}
    {%- set log = build_log_relation() -%}
    create schema if not exists {{ log.without_identifier() }};
    create table if not exists {{ log }} (
        event_date date not null,
        invocation_id varchar not null,
        users bigint not null,
        events bigint not null,
        built_at timestamp not null,
        audit_key varchar
    );
    {#- A ledger made before audit_key was recorded gains the column. #}
    alter table {{ log }} add column if not exists audit_key varchar;

    {%- set audit_key = var('audit_key', none) %}
    insert into {{ log }} (event_date, invocation_id, users, events, built_at, audit_key)
    with built_dates as (
        {% if date_range is none -%}
            select event_date from event_stats__replaced_dates
            union
            select distinct event_date from {{ this }}
        {%- else -%}
            select cast(unnest(range(
                date '{{ date_range.start }}', date '{{ date_range.end }}', interval 1 day
            )) as date) as event_date
        {%- endif %}
    ),

    published as (
        select
            event_date,
            count(*) as users,
            sum(event_count) as events
        from {{ this }}
        where {{ processed_dates_filter('event_date') }}
        group by event_date
    )

    select
        built_dates.event_date,
        '{{ invocation_id }}' as invocation_id,
        coalesce(published.users, 0) as users,
        cast(coalesce(published.events, 0) as bigint) as events,
        cast(now() at time zone 'UTC' as timestamp) as built_at,
        {% if audit_key is none or audit_key | string | trim == '' -%}
            cast(null as varchar)
        {%- else -%}
            '{{ audit_key | string | replace("'", "''") }}'
        {%- endif %} as audit_key
    from built_dates
    left join published on built_dates.event_date = published.event_date;

    {% if date_range is none -%}
        drop table event_stats__replaced_dates;
    {%- endif %}
    {#- On a DuckLake: the snapshot of this publish names the build (ducklake_snapshots). -#}
    {% if target.name == 'lake' %}
        call ducklake_set_commit_message('{{ this.database }}', 'dbt', '{{ invocation_id }}');
    {%- endif %}
{%- endmacro %}
