{#
    Events per (date, user), published from the audited stats (int_event_stats__audit, whose
    tests dbt runs first). Incremental delete+insert on the date partition: every date in
    [var start_date, var end_date) is replaced whole, including dates that became empty in raw
    (meta.replace_where, see macros/delete_insert_replace_where.sql); other dates are not touched.
    Without vars every date is processed, so the table is made equal to raw.events. A pre-hook
    refuses audited stats that raw.events no longer matches (macros/audit.sql). A retry of a
    publish that already committed (same audit_key) republishes the published rows unchanged.
    In the same transaction the post-hooks record the build in ops.build_log
    (macros/build_log.sql) and drop the audit table (macros/audit.sql).
#}
{{- forbid_full_refresh_with_date_range() }}
{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='event_date',
        on_schema_change='fail',
        meta={'replace_where': processed_dates_filter('event_date')},
        pre_hook=[
            "{{ require_audited_stats() }}",
            "{{ require_audit_matches_raw() }}",
            "{{ remember_replaced_dates() }}",
        ],
        post_hook=[
            "{{ write_build_log() }}",
            "{{ drop_audited_stats() }}",
        ],
    )
}}

-- depends_on: {{ ref('stg_events__events') }}

with audited as (

    {% if already_published() -%}
        select * from {{ this }}
    {%- else -%}
        select * from {{ ref('int_event_stats__audit') }}
    {%- endif %}
    where {{ processed_dates_filter('event_date') }}

),

final as (

    select
        event_date,
        user_id,
        event_count
    from audited

)

select * from final
