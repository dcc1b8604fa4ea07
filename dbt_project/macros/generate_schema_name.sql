{#
    A model's `schema` config is the schema it lands in, as written: `schema: analytics` gives
    `analytics`, not dbt's default `<target schema>_analytics`. Without `schema`, the target's.
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
