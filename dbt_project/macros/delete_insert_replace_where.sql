{#
    delete+insert that replaces whole partitions, including partitions that became empty.

    dbt-duckdb's delete+insert deletes only the unique_key values present in the new batch, so a
    date whose raw events all disappeared keeps its stale rows. A model can set
    `meta: {replace_where: <predicate>}` (the partitions it processes); then the delete also
    removes every target row matching that predicate. The incremental materialization runs this
    SQL between its BEGIN and COMMIT, so the widened delete and the insert are one transaction.
    Without `replace_where` this is dbt-duckdb's behaviour (keys of the batch only).

    dbt resolves `adapter.dispatch(..., 'dbt')` to the root project's macros first, so this
    overrides dbt-duckdb's macro of the same name for this project only.
#}
{% macro duckdb__get_delete_insert_merge_sql(
    target, source, unique_key, dest_columns, incremental_predicates
) -%}
    {%- set replace_where = (config.get('meta') or {}).get('replace_where') -%}
    {%- set dest_cols_csv = get_quoted_csv(dest_columns | map(attribute='name')) -%}
    {%- if unique_key is none -%}
        {{ exceptions.raise_compiler_error(
            'delete+insert needs a unique_key (the partition column) in ' ~ target
        ) }}
    {%- endif -%}
    {%- set keys = [unique_key] if unique_key is string else unique_key -%}

    delete from {{ target }} as dbt_target
    where (
        exists (
            select 1
            from {{ source }} as dbt_batch
            where
                {%- for key in keys %}
                {{ 'and ' if not loop.first }}dbt_batch.{{ key }} = dbt_target.{{ key }}
                {%- endfor %}
        )
        {%- if replace_where %}
            or ({{ replace_where }})
        {%- endif %}
    )
    {%- for predicate in incremental_predicates or [] %}
        and ({{ predicate }})
    {%- endfor %};

    insert into {{ target }} ({{ dest_cols_csv }})
    select {{ dest_cols_csv }}
    from {{ source }}
{%- endmacro %}
