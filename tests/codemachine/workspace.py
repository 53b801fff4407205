"""A CodeMachine workspace written the way its documentation describes (config/, templates/,
prompts/)."""

from __future__ import annotations

from pathlib import Path

MAIN_AGENTS = """\
const path = require('node:path');

// prompts live next to config/, like a CodeMachine project
const promptsDir = path.join(__dirname, '..', 'prompts', 'templates');

module.exports = [
  {
    id: 'init',
    name: 'Init',
    description: 'Prepares the working branch',
    promptPath: path.join(promptsDir, 'main-agents', '00-init.md'),
  },
  {
    id: 'code-generation',
    name: 'Code Generation Agent',
    description: "Implements the current task",
    promptPath: [
      path.join(promptsDir, 'shared', 'rules.md'),
      path.join(promptsDir, 'main-agents', '01-code.md'),
    ],
    chainedPromptsPath: path.join(promptsDir, 'main-agents', 'code-chained'),
  },
  {
    id: 'task-sanity-check',
    name: 'Task Reviewer',
    description: 'Verifies the code against the task',
    promptPath: path.join(promptsDir, 'main-agents', '02-review.md'),
    engine: 'claude',
  },
  {
    id: 'write-docs',
    name: 'Docs Writer',
    description: 'Documents what was built',
    promptPath: path.join(promptsDir, 'main-agents', '03-docs.md'),
  },
];
"""

SUB_AGENTS = """\
module.exports = [
  {
    id: 'founder-architect',
    name: 'Founder Architect',
    description: 'Lays out the foundation',
    mirrorPath: 'prompts/templates/sub-agents/founder.md',
  },
];
"""

MODULES = """\
const path = require('node:path');

const promptsDir = path.join(__dirname, '..', 'prompts', 'templates');

module.exports = [
  {
    id: 'check-task',
    name: 'Task Loop Checker',
    description: 'Signals whether the development steps must repeat',
    promptPath: path.join(promptsDir, 'workflows', 'check-task.md'),
    behavior: {
      type: 'loop',
      action: 'stepBack',
    },
  },
  {
    id: 'docs-gate',
    name: 'Docs Gate',
    promptPath: path.join(promptsDir, 'workflows', 'docs-gate.md'),
    behavior: { type: 'trigger', action: 'mainAgentCall', triggerAgentId: 'write-docs' },
  },
];
"""

PLACEHOLDERS = """\
const path = require('node:path');

module.exports = {
  userDir: {
    specifications: path.join('.codemachine', 'inputs', 'specifications.md'),
    plan: path.join('.codemachine', 'artifacts', 'plan', '*.md'),
    tasks: path.join('.codemachine', 'artifacts', 'tasks.json'),
  },
  packageDir: {
    command_constraints: path.join('prompts', 'templates', 'shared', 'constraints.md'),
  },
};
"""

WORKFLOW = """\
export default {
  name: 'Greeting Workflow',
  steps: [
    resolveStep('init', { executeOnce: true }), // set up once
    resolveUI("∴ Development ∴"),
    resolveStep('code-generation', { engine: 'codex', model: 'gpt-5-codex' }),
    resolveStep('task-sanity-check', { model: 'sonnet', agentName: 'Reviewer' }),
    resolveModule('check-task', { loopSteps: 2, loopMaxIterations: 3, loopSkip: ['init'] }),
    separator("◈ Docs ◈"),
    resolveModule('docs-gate'),
  ],
  subAgentIds: ['founder-architect'],
};
"""

OTHER_WORKFLOW = """\
export default {
  name: 'Only Init',
  steps: [resolveStep('init')],
};
"""

PROMPTS = {
    "prompts/templates/main-agents/00-init.md": "Create a branch and read {specifications}.\n",
    "prompts/templates/shared/rules.md": "Follow these rules:\n{command_constraints}\n",
    "prompts/templates/shared/constraints.md": "Never delete files you did not create.",
    "prompts/templates/main-agents/01-code.md": (
        "Implement the next task from {tasks} following {plan}.\n"
        "Braces in code stay: {not_a_placeholder}.\n"
    ),
    "prompts/templates/main-agents/code-chained/01-tests.md": "Now add tests.\n",
    "prompts/templates/main-agents/code-chained/02-polish.md": "Now polish.\n",
    "prompts/templates/main-agents/02-review.md": "Review the change against {tasks}.\n",
    "prompts/templates/main-agents/03-docs.md": "Write docs/GREETING.md.\n",
    "prompts/templates/workflows/check-task.md": "Are all tasks in {tasks} done?\n",
    "prompts/templates/workflows/docs-gate.md": "Decide whether docs are needed.\n",
    "prompts/templates/sub-agents/founder.md": "You are the founder architect.\n",
}


def workspace_files() -> dict[str, str]:
    return {
        "config/main.agents.js": MAIN_AGENTS,
        "config/sub.agents.js": SUB_AGENTS,
        "config/modules.js": MODULES,
        "config/placeholders.js": PLACEHOLDERS,
        "templates/workflows/greeting.workflow.js": WORKFLOW,
        "templates/workflows/only-init.workflow.js": OTHER_WORKFLOW,
        ".codemachine/template.json": '{"activeTemplate": "greeting.workflow.js"}\n',
        ".codemachine/inputs/specifications.md": "# Add a greeting\n\nA module that greets.\n",
        **PROMPTS,
    }


def write_workspace(root: Path, files: dict[str, str] | None = None) -> Path:
    for rel, text in (files or workspace_files()).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root
